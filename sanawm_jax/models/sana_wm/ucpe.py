"""UCPE feature transforms of the camera branch: per-ray 4x4 maps on half of each head, reduced RoPE on the other.

The per-token matrices come from `sanawm_jax.camera.ucpe_ray_matrices` (world -> ray frame). Queries are encoded
with Pᵀ, keys and values with P⁻¹, and attention outputs are decoded with P and the inverse rotation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from sanawm_jax import camera
from sanawm_jax.models.sana_wm.layers import RotaryTables, apply_rope, rotary_tables


class RayTransforms(NamedTuple):
    """Per-token UCPE transforms shared by every block. matrices/inverse: (B, N, 4, 4); rotary: (N, D/2) tables of
    the reduced RoPE."""

    matrices: jnp.ndarray
    inverse: jnp.ndarray
    rotary: RotaryTables


def camera_rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) complex pairs of the reduced RoPE on the second half (D/2 channels) of a camera head: 10/9/9 for
    D=112, sliced from the leading pairs of each axis of the main table."""
    rope_dim = head_dim // 2
    pairs_hw = rope_dim // 6
    return rope_dim // 2 - 2 * pairs_hw, pairs_hw, pairs_hw


def ray_transforms(camera_conditions, grid, patch_size, head_dim: int, max_seq_len: int,
                   start_frame=None) -> RayTransforms:
    """camera_conditions (B, T, 20) on a (T, h, w) token grid -> RayTransforms (float32); `start_frame` as in
    `rotary_tables` (streaming mode: the absolute position of the block's first frame)."""
    matrices = camera.ucpe_ray_matrices(camera_conditions.astype(jnp.float32), grid, patch_size)
    rotary = rotary_tables(grid, head_dim, max_seq_len, pairs=camera_rope_pairs(head_dim), start_frame=start_frame)
    return RayTransforms(matrices, camera.invert_se3(matrices), rotary)


def ucpe_transform(x, matrices, rotary: RotaryTables, inverse_rope: bool = False, transpose: bool = False):
    """x (B, N, H, D) -> same, float32: first D/2 channels in groups of 4 times the token's 4x4 matrix (its
    transpose if `transpose`), last D/2 rotated by the `rotary` tables (N, D/2).

    The 4x4 products are written as four multiply-adds of matrix columns: XLA fuses them with the rest of the
    transform into one elementwise pass, where an einsum becomes a batched matmul of N tiny 4x4 matrices. The
    transpose's columns are read as the matrix's rows: a transposed matrix inside the fusion cost a layout copy per
    element.
    """
    b, n, h, d = x.shape
    x = x.astype(jnp.float32)
    groups = x[..., : d // 2].reshape(b, n, h, d // 8, 4)
    matrices = matrices.astype(jnp.float32)[:, :, None, None]  # (B, N, 1, 1, 4, 4)
    column = (lambda j: matrices[..., j, :]) if transpose else (lambda j: matrices[..., j])
    projected = sum(column(j) * groups[..., j, None] for j in range(4)).reshape(b, n, h, d // 2)
    rotated = apply_rope(x[..., d // 2 :], rotary, inverse=inverse_rope)
    return jnp.concatenate([projected, rotated], axis=-1)


def channel_rms(x, eps: float = 1e-6):
    """RMS over the head channels: (B, N, H, D) -> (B, N, H, 1)."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def downscale_to_reference_rms(reference, transformed, eps: float = 1e-6):
    """Scale `transformed` down (never up) so its per-head channel RMS does not exceed that of `reference`."""
    scale = jnp.minimum(channel_rms(reference, eps) / jnp.maximum(channel_rms(transformed, eps), eps), 1.0)
    return transformed * scale


def encode(query, key, value, transforms: RayTransforms):
    """UCPE-encode camera q/k/v (B, N, H, D) and bring each back to its pre-transform RMS envelope (float32)."""
    query_ucpe = ucpe_transform(query, transforms.matrices, transforms.rotary, transpose=True)
    key_ucpe = ucpe_transform(key, transforms.inverse, transforms.rotary)
    value_ucpe = ucpe_transform(value, transforms.inverse, transforms.rotary)
    return (
        downscale_to_reference_rms(query.astype(jnp.float32), query_ucpe),
        downscale_to_reference_rms(key.astype(jnp.float32), key_ucpe),
        downscale_to_reference_rms(value.astype(jnp.float32), value_ucpe),
    )


def decode(x, transforms: RayTransforms):
    """Map camera-branch outputs (B, N, H, D) from ray space back to world space (float32)."""
    return ucpe_transform(x, transforms.matrices, transforms.rotary, inverse_rope=True)
