"""Chunk layout of the chunk-causal and streaming modes.

Latent frames are grouped into chunks of `chunk_frames` frames, the first chunk one frame longer (it holds the
conditioning frame): starts 0, 4, 7, 10, ... for chunk_frames = 3. A remainder shorter than a chunk joins the last
chunk (41 frames: 4, 3 x 11, 4). Inside a chunk every frame sees every other; across chunks information flows only
forwards. Everything here is static (numpy / Python), so the layout is baked into the compiled program.
"""

from __future__ import annotations

import numpy as np


def chunk_starts(num_frames: int, chunk_frames: int) -> tuple[int, ...]:
    """First frame of every chunk, e.g. (0, 4, 7, 10) for 13 frames of chunk_frames = 3."""
    if num_frames < 1 or chunk_frames < 1:
        raise ValueError(f"need num_frames >= 1 and chunk_frames >= 1, got {num_frames} and {chunk_frames}")
    starts = [0]
    next_start = chunk_frames + 1
    while next_start + chunk_frames <= num_frames:
        starts.append(next_start)
        next_start += chunk_frames
    return tuple(starts)


def chunk_ids(starts: tuple[int, ...], num_frames: int) -> np.ndarray:
    """(T,) int32 index of the chunk of every frame."""
    opens = np.zeros(num_frames, np.int32)
    opens[list(starts[1:])] = 1
    return np.cumsum(opens).astype(np.int32)


def start_mask(starts: tuple[int, ...], num_frames: int) -> np.ndarray:
    """(T,) bool, True on frames that open a chunk (the `chunk_starts` argument of `ops.gdn.frame_gdn`)."""
    mask = np.zeros(num_frames, bool)
    mask[list(starts)] = True
    return mask


def same_chunk_ahead(starts: tuple[int, ...], num_frames: int, offset: int, frame_index=None) -> np.ndarray:
    """float32 of frame_index's shape ((T,), every frame, by default): 1 where frames f and f + offset (offset > 0)
    both exist and lie in the same chunk, else 0. frame_index: frame numbers f, any shape, may lie outside [0, T)."""
    index = np.arange(num_frames) if frame_index is None else np.asarray(frame_index)
    ids = chunk_ids(starts, num_frames)
    inside = (index >= 0) & (index + offset < num_frames)
    same = ids[np.clip(index, 0, num_frames - 1)] == ids[np.clip(index + offset, 0, num_frames - 1)]
    return (inside & same).astype(np.float32)


def later_chunk_ahead(starts: tuple[int, ...], num_frames: int, offset: int, frame_index=None) -> np.ndarray:
    """Like `same_chunk_ahead`, but 1 where frame f + offset exists and lies in a later chunk than frame f."""
    index = np.arange(num_frames) if frame_index is None else np.asarray(frame_index)
    inside = (index >= 0) & (index + offset < num_frames)
    return inside.astype(np.float32) - same_chunk_ahead(starts, num_frames, offset, index)
