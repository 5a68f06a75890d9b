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


def same_chunk_ahead(starts: tuple[int, ...], num_frames: int, offset: int) -> np.ndarray:
    """(T,) float32: 1 where frame t + offset exists and lies in the chunk of frame t (offset > 0), else 0."""
    ids = chunk_ids(starts, num_frames)
    ahead = np.zeros(num_frames, np.float32)
    ahead[: num_frames - offset] = ids[offset:] == ids[: num_frames - offset]
    return ahead
