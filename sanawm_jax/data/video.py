"""Video files: decode a window of frames and count the rest, encode frames to mp4 at once or progressively (ffmpeg
via imageio-ffmpeg)."""

from __future__ import annotations

import os
from pathlib import Path

import imageio_ffmpeg
import numpy as np

DEFAULT_FPS = 16

# imageio-ffmpeg otherwise starts ffmpeg with a Python `preexec_fn`, which can hang when other threads (the loader's,
# JAX's) run during the fork; without it the child process is spawned without running Python code.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def read_video_window(path: str | Path, start: int, count: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Decode frames [start, start + count) of a video and count all of its frames.

    Returns (frames (n, H, W, 3) uint8 with n = min(count, available after start), total frame count, (H, W)).
    The whole stream is decoded so the count is exact; only the window is kept. Unreadable files raise OSError.
    """
    if start < 0 or count < 0:
        raise ValueError(f"frame window must be non-negative, got start={start}, count={count}")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = reader.__next__()
        width, height = meta["size"]
        kept, total = [], 0
        for raw in reader:
            if start <= total < start + count:
                kept.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            total += 1
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"cannot decode video {path}: {first_line}") from error
    frames = np.stack(kept) if kept else np.zeros((0, height, width, 3), np.uint8)
    return frames, total, (height, width)


class VideoWriter:
    """H.264 mp4 encoding frame by frame: frames are handed to ffmpeg as they are appended, so a long video is never
    held in memory. The frame size is fixed by the first `append`. Identical inputs give identical files.

    `progressive` makes the file playable while it is being written, for watching a stream as it is generated: a
    fragmented mp4 with a keyframe (a new fragment) every second, no encoder lookahead (x264 `zerolatency`, so each
    frame is encoded when it arrives) and every packet flushed to disk; it compresses less well. Otherwise the file
    is readable once closed.

        with VideoWriter("out.mp4") as writer:
            for block in blocks:          # (n, H, W, 3) uint8 each
                writer.append(block)

    `crf` is the x264 constant-rate factor (0 = lossless in YUV); "yuv444p" keeps full colour resolution.
    """

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS, crf: int = 10, pix_fmt: str = "yuv420p",
                 progressive: bool = False):
        self.path, self.fps, self.crf, self.pix_fmt, self.progressive = Path(path), fps, crf, pix_fmt, progressive
        self.size: tuple[int, int] | None = None  # (H, W) once the first frames arrived
        self.num_frames = 0
        self._writer = None

    def append(self, frames: np.ndarray) -> None:
        """Encode frames (n, H, W, 3) uint8 (n may be 0)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be an (n, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
        if self._writer is None:
            self._open(frames.shape[1:3])
        if frames.shape[1:3] != self.size:
            raise ValueError(f"frames of size {frames.shape[1:3]} appended to a video of size {self.size}")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.num_frames += len(frames)

    def _open(self, size: tuple[int, int]) -> None:
        height, width = size
        if self.pix_fmt == "yuv420p" and (height % 2 or width % 2):
            raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
        output_params = ["-crf", str(self.crf), "-fflags", "+bitexact", "-map_metadata", "-1"]
        if self.progressive:
            output_params += ["-movflags", "frag_keyframe+empty_moov+default_base_moof", "-g", str(round(self.fps)),
                              "-tune", "zerolatency", "-flush_packets", "1"]
        self._writer = imageio_ffmpeg.write_frames(
            str(self.path),
            (width, height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_out=self.pix_fmt,
            macro_block_size=1,
            output_params=output_params,
            ffmpeg_log_level="error",
        )
        self._writer.send(None)
        self.size = size

    def close(self) -> None:
        """Finish the file (a writer that received no frames writes nothing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_video(
    path: str | Path, frames: np.ndarray, fps: float = DEFAULT_FPS, crf: int = 10, pix_fmt: str = "yuv420p"
) -> None:
    """Encode frames (F, H, W, 3) uint8 to an H.264 mp4 in one go (see `VideoWriter`)."""
    frames = np.asarray(frames)
    if len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (F, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    with VideoWriter(path, fps, crf, pix_fmt) as writer:
        writer.append(frames)
