"""Video files: decode a window of frames and count the rest, encode frames to mp4 (ffmpeg via imageio-ffmpeg)."""

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


def write_video(
    path: str | Path, frames: np.ndarray, fps: float = DEFAULT_FPS, crf: int = 10, pix_fmt: str = "yuv420p"
) -> None:
    """Encode frames (F, H, W, 3) uint8 to an H.264 mp4; identical inputs give identical files.

    `crf` is the x264 constant-rate factor (0 = lossless in YUV); "yuv444p" keeps full colour resolution.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (F, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out=pix_fmt,
        macro_block_size=1,
        output_params=["-crf", str(crf), "-fflags", "+bitexact", "-map_metadata", "-1"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
