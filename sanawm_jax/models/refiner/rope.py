"""LTX-2 rotary tables: fractional positions -> (cos, sin), and their application to (B, N, H*D) projections.

Positions are built in numpy float32 in the order the LTX-2 reference computes them (they depend on Python ints only),
so the tables are constants of a traced forward. Frequencies are theta^linspace(0, 1) in float64, times pi/2, rounded
to float32; the angle of position p in [0, 1] is (2p - 1) * frequency.

Layouts: "interleaved" tables are (N, dim) with each frequency repeated for an adjacent pair, leading pad entries
(cos 1, sin 0) filling dim % (2 * axes); "split" tables are (N, H, D/2) rotating the two halves of each head.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_tables(fractions: np.ndarray, dim: int, theta: float, rope_type: str, num_heads: int):
    """fractions (N, axes) float32 positions in units of the base extent -> (cos, sin) float32 tables."""
    fractions = np.asarray(fractions, np.float32)
    axes = fractions.shape[1]
    steps = dim // (2 * axes)
    frequencies = (theta ** np.linspace(0.0, 1.0, steps, dtype=np.float64) * np.pi / 2.0).astype(np.float32)
    angles = (fractions[:, :, None] * np.float32(2) - np.float32(1)) * frequencies  # (N, axes, steps)
    angles = np.swapaxes(angles, 1, 2).reshape(len(fractions), steps * axes)
    cos, sin = np.cos(angles), np.sin(angles)
    if rope_type == "interleaved":
        cos, sin = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        pad = dim % (2 * axes)
    elif rope_type == "split":
        pad = dim // 2 - steps * axes
    else:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    cos = np.concatenate([np.ones((len(cos), pad), np.float32), cos], axis=-1)
    sin = np.concatenate([np.zeros((len(sin), pad), np.float32), sin], axis=-1)
    if rope_type == "split":
        cos, sin = cos.reshape(len(cos), num_heads, -1), sin.reshape(len(sin), num_heads, -1)
    return jnp.asarray(cos), jnp.asarray(sin)


def apply_rope(x, tables, rope_type: str):
    """x (B, N, H*D) rotated by tables from `rope_tables` (without or with a leading batch axis); float32 math,
    result in x.dtype."""
    cos, sin = tables
    b, n, width = x.shape
    x32 = x.astype(jnp.float32)
    if rope_type == "interleaved":
        pairs = x32.reshape(b, n, width // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(b, n, width)
        return (x32 * cos + rotated * sin).astype(x.dtype)
    heads = cos.shape[-2]
    halves = x32.reshape(b, n, heads, 2, -1)
    first, second = halves[..., 0, :], halves[..., 1, :]
    out = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-2)
    return out.reshape(b, n, width).astype(x.dtype)


def video_fractions(frame_positions, height: int, width: int, *, scale_factors, causal_offset: int, fps: float,
                    max_positions) -> np.ndarray:
    """Latent frames at absolute indices `frame_positions` on a (height, width) latent grid -> (N, 3) float32
    patch-centre positions (seconds, pixels, pixels) divided by `max_positions`; N = frames*height*width, row-major.

    A latent spans [i, i + 1) on each axis, scaled to pixels; the time axis is shifted by causal_offset - stride
    (clamped at 0: the first latent covers one frame) and divided by fps.
    """
    grid = np.stack(np.meshgrid(np.asarray(frame_positions, np.float32), np.arange(height, dtype=np.float32),
                                np.arange(width, dtype=np.float32), indexing="ij"), axis=0).reshape(3, -1)
    scale = np.asarray(scale_factors, np.float32)[:, None]
    start, end = grid * scale, (grid + np.float32(1)) * scale
    for bound in (start, end):
        bound[0] = np.maximum(bound[0] + np.float32(causal_offset - scale_factors[0]), 0) / np.float32(fps)
    centre = (start + end) / np.float32(2)
    return (centre / np.asarray(max_positions, np.float32)[:, None]).T.copy()
