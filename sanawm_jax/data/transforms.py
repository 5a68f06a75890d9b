"""Per-clip steps of the loader: check a record, cut a temporal window, resize and crop, metric relative poses,
camera tensors, text embeddings, and the final example dict.

`check_record` and `read_window` turn a source's `ClipRecord` into a `Clip`; the later steps take and return a `Clip`,
`to_example` makes the dict that is batched. Randomness comes from the caller's numpy Generator. Camera math is
`sanawm_jax.camera`, the code the sampler uses.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import PIL.Image

from sanawm_jax import camera
from sanawm_jax.data.format import TextEmbeddingStore
from sanawm_jax.data.sources import BadClipError, ClipRecord
from sanawm_jax.data.video import read_video_window

RIGID_TOLERANCE = 1e-3  # float32 poses from SfM are orthonormal to ~1e-6; anything far off is not a rotation


@dataclasses.dataclass(frozen=True)
class Clip:
    """A temporal window of one clip on its way to becoming a training example.

    c2w (F, 4, 4) and intrinsics (F, 4) cover the window's F pixel frames; intrinsics are in pixels of `image_size`
    (H, W), the size of `frames` (F, H, W, 3) uint8. Cached `latents` (T, h, w, C) encode frames of `encoded_size`.
    `frame_start` is the window's first frame in the source clip. Later steps fill the camera tensors and the text
    embedding.
    """

    index: int
    key: str
    caption: str
    c2w: np.ndarray
    intrinsics: np.ndarray
    image_size: tuple[int, int]
    metric_scale: float
    frame_start: int
    intrinsics_mapping: str = "center_crop"
    frames: np.ndarray | None = None
    latents: np.ndarray | None = None
    encoded_size: tuple[int, int] | None = None
    camera_conditions: np.ndarray | None = None
    chunk_plucker: np.ndarray | None = None
    text: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    caption_dropped: bool = False


def latent_frames(num_frames: int, time_stride: int) -> int:
    """Latent frames a causal video VAE makes from the first (num_frames - 1) // stride * stride + 1 frames."""
    return (num_frames - 1) // time_stride + 1


def check_record(record: ClipRecord, num_frames: int, text_store: TextEmbeddingStore | None) -> None:
    """Raise BadClipError unless the record has a caption, one finite rigid pose and intrinsics row per frame,
    positive focal lengths, a finite positive metric scale, at least `num_frames` frames, and (given a store) a cached
    text embedding for its caption."""
    key = record.key
    if not isinstance(record.caption, str) or not record.caption.strip():
        raise BadClipError(key, "caption is missing or empty")
    c2w, intrinsics = np.asarray(record.c2w), np.asarray(record.intrinsics)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or intrinsics.ndim != 2 or intrinsics.shape[1] != 4:
        raise BadClipError(key, f"c2w must be (N, 4, 4) and intrinsics (N, 4), got {c2w.shape} and {intrinsics.shape}")
    if len(c2w) != record.num_frames or len(intrinsics) != record.num_frames:
        raise BadClipError(
            key, f"{len(c2w)} poses and {len(intrinsics)} intrinsics rows for a clip of {record.num_frames} frames"
        )
    if not (np.all(np.isfinite(c2w)) and np.all(np.isfinite(intrinsics))):
        raise BadClipError(key, "poses or intrinsics contain NaN or infinite values")
    rotations = c2w[:, :3, :3].astype(np.float64)
    orthonormality = np.abs(rotations @ rotations.transpose(0, 2, 1) - np.eye(3)).max()
    if orthonormality > RIGID_TOLERANCE or np.abs(c2w[:, 3] - [0, 0, 0, 1]).max() > RIGID_TOLERANCE:
        raise BadClipError(key, "poses are not rigid transforms (rotation not orthonormal or bottom row not 0 0 0 1)")
    if np.any(intrinsics[:, :2] <= 0):
        raise BadClipError(key, "focal lengths must be positive")
    if not (np.isfinite(record.metric_scale) and record.metric_scale > 0):
        raise BadClipError(key, f"metric scale must be finite and positive, got {record.metric_scale}")
    if record.num_frames < num_frames:
        raise BadClipError(key, f"has {record.num_frames} frames, the window needs {num_frames}")
    if text_store is not None and record.caption not in text_store:
        raise BadClipError(key, "caption has no cached text embedding")


def read_window(
    record: ClipRecord,
    index: int,
    num_frames: int,
    time_stride: int,
    start: int,
) -> Clip:
    """Read frames [start, start + num_frames) of a checked record (videos), or the latents of its first
    num_frames frames (cached latents, which must start at 0), with the matching poses and intrinsics.

    Raises BadClipError when the video is unreadable, its frame count or size differs from the record, or the
    latents' frame count does not match the poses.
    """
    key = record.key
    window = slice(start, start + num_frames)
    common = dict(
        index=index,
        key=key,
        caption=record.caption,
        c2w=np.asarray(record.c2w, np.float32)[window],
        intrinsics=np.asarray(record.intrinsics, np.float32)[window],
        metric_scale=float(record.metric_scale),
        frame_start=start,
        intrinsics_mapping=record.intrinsics_mapping,
        image_size=tuple(record.source_size),
    )
    if record.video is not None:
        try:
            frames, total, size = read_video_window(record.video, start, num_frames)
        except OSError as error:
            raise BadClipError(key, str(error)) from error
        if total != record.num_frames:
            raise BadClipError(key, f"video has {total} frames but the camera has {record.num_frames} poses")
        if size != tuple(record.source_size):
            raise BadClipError(key, f"video is {size[0]}x{size[1]}, the intrinsics refer to {record.source_size}")
        return Clip(frames=frames, **common)
    if start != 0:
        raise ValueError("windows of cached latents start at frame 0")
    try:
        latents, pixel_size = record.latents.read()
    except (OSError, ValueError, KeyError) as error:
        raise BadClipError(key, f"latents unreadable: {error}") from error
    expected = latent_frames(record.num_frames, time_stride)
    if len(latents) != expected:
        raise BadClipError(key, f"latents have {len(latents)} frames, {record.num_frames} poses need {expected}")
    if not np.all(np.isfinite(latents)):
        raise BadClipError(key, "latents contain NaN or infinite values")
    return Clip(latents=latents[: latent_frames(num_frames, time_stride)], encoded_size=pixel_size, **common)


def window_start(record: ClipRecord, num_frames: int, rng: np.random.Generator | None) -> int:
    """First frame of the window: uniform over the clip for videos given an rng, else 0 (always 0 for latents,
    whose first latent frame stands for pixel frame 0 alone)."""
    if rng is None or record.video is None:
        return 0
    return int(rng.integers(0, record.num_frames - num_frames + 1))


def resize_crop(clip: Clip, target_size: tuple[int, int]) -> Clip:
    """Frames resized (Lanczos) to cover target_size (H, W) and centre-cropped, intrinsics mapped to match.

    Cached latents were made from frames of `encoded_size`, which must equal target_size (else BadClipError); their
    intrinsics are mapped from the source size by the clip's `intrinsics_mapping` ("center_crop" as for videos, or
    "stretch": plain per-axis scaling).
    """
    source_size, target_size = tuple(clip.image_size), tuple(target_size)
    if clip.latents is not None:
        if clip.encoded_size != target_size:
            raise BadClipError(clip.key, f"latents encode {clip.encoded_size} frames, the loader wants {target_size}")
        if clip.intrinsics_mapping == "stretch":
            (source_h, source_w), (height, width) = source_size, target_size
            scale = np.array([width / source_w, height / source_h, width / source_w, height / source_h], np.float32)
            intrinsics = clip.intrinsics * scale
        else:
            intrinsics = camera.resize_crop_intrinsics(clip.intrinsics, source_size, target_size)
        return dataclasses.replace(clip, intrinsics=intrinsics, image_size=target_size)
    return dataclasses.replace(
        clip,
        frames=resize_crop_frames(clip.frames, target_size),
        intrinsics=camera.resize_crop_intrinsics(clip.intrinsics, source_size, target_size),
        image_size=target_size,
    )


def resize_crop_frames(frames: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, *target_size, 3): Lanczos resize to cover target_size, then centre crop
    (the geometry of `camera.center_crop_geometry`)."""
    (resized_h, resized_w), (top, left) = camera.center_crop_geometry(frames.shape[1:3], target_size)
    if (resized_h, resized_w) != frames.shape[1:3]:
        frames = np.stack(
            [np.asarray(PIL.Image.fromarray(f).resize((resized_w, resized_h), PIL.Image.LANCZOS)) for f in frames]
        )
    height, width = target_size
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def metric_relative_poses(clip: Clip) -> Clip:
    """Translations times the metric scale, then poses relative to the window's first frame (frame 0 = I)."""
    c2w = clip.c2w.copy()
    c2w[:, :3, 3] *= clip.metric_scale
    return dataclasses.replace(clip, c2w=np.asarray(camera.relative_poses(c2w)), metric_scale=1.0)


def attach_camera_tensors(clip: Clip, target_size: tuple[int, int], vae_stride: tuple[int, int, int]) -> Clip:
    """camera_conditions (T, 20) and chunk_plucker (T, h, w, 6*stride_t) by `camera.prepare_camera`, on the host CPU."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        conditions, plucker = camera.prepare_camera(clip.c2w, clip.intrinsics, target_size, vae_stride)
    return dataclasses.replace(clip, camera_conditions=np.asarray(conditions), chunk_plucker=np.asarray(plucker))


def attach_text(clip: Clip, store: TextEmbeddingStore, dropout: float, rng: np.random.Generator) -> Clip:
    """The caption's cached embedding, or with probability `dropout` the null embedding."""
    dropped = bool(rng.random() < dropout)
    text, mask = store.null() if dropped else store.get(clip.caption)
    return dataclasses.replace(clip, text=text, text_mask=mask, caption_dropped=dropped)


def to_example(clip: Clip) -> dict[str, np.ndarray]:
    """The arrays of a training example.

    "video" (F, H, W, 3) float32 in [-1, 1] or "latents" (T, h, w, C) float32; "camera_conditions" (T, 20);
    "chunk_plucker" (T, h, w, 48); "c2w" (F, 4, 4) metric poses relative to frame 0; "intrinsics" (F, 4) in pixels
    of the target size; with text: "text" (L, D), "text_mask" (L,) bool, "caption_dropped" bool; and "caption",
    "key" (str), "clip_index", "frame_start" (int64).
    """
    example = {
        "camera_conditions": clip.camera_conditions,
        "chunk_plucker": clip.chunk_plucker,
        "c2w": clip.c2w.astype(np.float32),
        "intrinsics": clip.intrinsics.astype(np.float32),
        "caption": np.asarray(clip.caption),
        "key": np.asarray(clip.key),
        "clip_index": np.int64(clip.index),
        "frame_start": np.int64(clip.frame_start),
    }
    if clip.frames is not None:
        example["video"] = clip.frames.astype(np.float32) / 127.5 - 1.0
    else:
        example["latents"] = clip.latents
    if clip.text is not None:
        example.update(text=clip.text, text_mask=clip.text_mask, caption_dropped=np.bool_(clip.caption_dropped))
    return example
