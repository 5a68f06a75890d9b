"""Our on-disk format for pose-annotated clips and for cached text embeddings (see docs/data.md).

A clip directory:

    clips.jsonl            one `ClipMetadata` JSON object per line
    videos/<key>.mp4       RGB video (optional once latents are cached)
    cameras/<key>.npz      c2w (F, 4, 4) float32 camera-to-world, OpenCV axes;
                           intrinsics (F, 4) float32 [fx, fy, cx, cy] in pixels of the source video
    latents/<key>.npz      latents (T, h, w, C) channels-last; pixel_size (2,) (H, W) of the encoded frames

A text-embedding directory:

    null.npz               embedding (L, D), mask (L,): the unconditional embedding used for caption dropout
    <sha256>.npz           embedding (L, D), mask (L,), caption: one per caption, named by the caption's SHA-256
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sanawm_jax.data.video import DEFAULT_FPS, write_video

INDEX_FILE = "clips.jsonl"
VIDEO_DIR = "videos"
CAMERA_DIR = "cameras"
LATENT_DIR = "latents"
NULL_TEXT_FILE = "null.npz"


@dataclasses.dataclass(frozen=True)
class ClipMetadata:
    """One line of clips.jsonl.

    num_frames: frames of the video, which is also the number of poses and intrinsics rows.
    height, width: source video size, the pixel grid the intrinsics refer to.
    metric_scale: factor that brings pose translations to metres (1.0 when they already are).
    video, latents: paths relative to the clip directory, None when absent.
    """

    key: str
    caption: str | None
    num_frames: int
    height: int
    width: int
    fps: float = DEFAULT_FPS
    metric_scale: float = 1.0
    video: str | None = None
    latents: str | None = None

    @classmethod
    def from_json(cls, line: str) -> "ClipMetadata":
        values = json.loads(line)
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"clip metadata has unknown fields {unknown}: {line.strip()}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def read_index(root: str | Path) -> list[ClipMetadata]:
    """The clips of a clip directory, in file order."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"{root} is not a clip directory: {INDEX_FILE} is missing")
    with open(path, encoding="utf-8") as file:
        return [ClipMetadata.from_json(line) for line in file if line.strip()]


def write_index(root: str | Path, clips: list[ClipMetadata]) -> None:
    """Write clips.jsonl (atomically replacing an existing index); keys must be unique."""
    keys = [clip.key for clip in clips]
    if len(set(keys)) != len(keys):
        raise ValueError("clip keys must be unique")
    path = Path(root) / INDEX_FILE
    temporary = path.with_suffix(".jsonl.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(clip.to_json() + "\n" for clip in clips)
    os.replace(temporary, path)


def write_clip(
    root: str | Path,
    key: str,
    *,
    c2w: np.ndarray,
    intrinsics: np.ndarray,
    caption: str | None,
    frames: np.ndarray,
    fps: float = DEFAULT_FPS,
    metric_scale: float = 1.0,
    **video_options,
) -> ClipMetadata:
    """Write a clip's video (frames (F, H, W, 3) uint8) and camera; returns its metadata for the index.

    c2w (F, 4, 4) and intrinsics (F, 4) are stored as given (float32); `video_options` go to `write_video`.
    """
    frames = np.asarray(frames)
    c2w = np.asarray(c2w, np.float32)
    intrinsics = np.asarray(intrinsics, np.float32)
    num_frames = len(frames)
    if c2w.shape != (num_frames, 4, 4) or intrinsics.shape != (num_frames, 4):
        raise ValueError(
            f"clip {key!r}: {num_frames} frames need c2w ({num_frames}, 4, 4) and intrinsics ({num_frames}, 4), "
            f"got {c2w.shape} and {intrinsics.shape}"
        )
    root = Path(root)
    (root / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    video = f"{VIDEO_DIR}/{key}.mp4"
    write_video(root / video, frames, fps=fps, **video_options)
    write_camera(root, key, c2w, intrinsics)
    height, width = frames.shape[1:3]
    return ClipMetadata(key, caption, num_frames, height, width, fps, float(metric_scale), video=video)


def camera_path(root: str | Path, key: str) -> Path:
    return Path(root) / CAMERA_DIR / f"{key}.npz"


def write_camera(root: str | Path, key: str, c2w: np.ndarray, intrinsics: np.ndarray) -> None:
    """Store a clip's c2w (F, 4, 4) and intrinsics (F, 4) as float32."""
    (Path(root) / CAMERA_DIR).mkdir(parents=True, exist_ok=True)
    np.savez(camera_path(root, key), c2w=np.asarray(c2w, np.float32), intrinsics=np.asarray(intrinsics, np.float32))


def write_latents(root: str | Path, key: str, latents: np.ndarray, pixel_size: tuple[int, int]) -> str:
    """Store latents (T, h, w, C) of frames of `pixel_size` (H, W); returns the path relative to root."""
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (T, h, w, C), got {latents.shape}")
    (Path(root) / LATENT_DIR).mkdir(parents=True, exist_ok=True)
    relative = f"{LATENT_DIR}/{key}.npz"
    np.savez(Path(root) / relative, latents=latents, pixel_size=np.asarray(pixel_size, np.int64))
    return relative


def read_latents(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """latents (T, h, w, C) float32 and the (H, W) pixel size they encode."""
    with np.load(path, allow_pickle=False) as stored:
        return stored["latents"].astype(np.float32), tuple(int(v) for v in stored["pixel_size"])


class TextEmbeddingStore:
    """Cached text-encoder outputs: embedding (L, D) and mask (L,) per caption, plus the null embedding."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, caption: str) -> Path:
        return self.root / f"{hashlib.sha256(caption.encode('utf-8')).hexdigest()}.npz"

    def __contains__(self, caption: str) -> bool:
        return self._path(caption).is_file()

    def get(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """(embedding (L, D) float32, mask (L,) bool) of a caption; KeyError when it is not cached."""
        path = self._path(caption)
        if not path.is_file():
            raise KeyError(f"no cached text embedding for caption {caption[:60]!r}")
        return _read_embedding(path)

    def null(self) -> tuple[np.ndarray, np.ndarray]:
        """The unconditional embedding (L, D) float32 and mask (L,) bool."""
        path = self.root / NULL_TEXT_FILE
        if not path.is_file():
            raise ValueError(f"text-embedding directory {self.root} has no {NULL_TEXT_FILE}")
        return _read_embedding(path)

    def put(self, caption: str, embedding: np.ndarray, mask: np.ndarray) -> None:
        self._write(self._path(caption), embedding, mask, caption=np.asarray(caption))

    def put_null(self, embedding: np.ndarray, mask: np.ndarray) -> None:
        self._write(self.root / NULL_TEXT_FILE, embedding, mask)

    def _write(self, path: Path, embedding: np.ndarray, mask: np.ndarray, **extra) -> None:
        embedding, mask = np.asarray(embedding), np.asarray(mask)
        if embedding.ndim != 2 or mask.shape != embedding.shape[:1]:
            raise ValueError(f"text embedding must be (L, D) with mask (L,), got {embedding.shape} and {mask.shape}")
        self.root.mkdir(parents=True, exist_ok=True)
        np.savez(path, embedding=embedding, mask=mask.astype(bool), **extra)


def _read_embedding(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return stored["embedding"].astype(np.float32), stored["mask"].astype(bool)
