"""Dual-branch self-attention of a SANA-WM block: a main branch (RoPE) plus a camera branch (UCPE), summed, gated
by SiLU(output_gate(x)) and projected.

Two kinds share one parameter layout:
  "gdn":     bidirectional frame-level Gated DeltaNet in both branches (ReLU kernels, short conv on K,
             per-token β and per-frame decay gates); the camera branch runs the numerator-only recurrence.
  "softmax": full non-causal softmax attention in both branches; the GDN-only gate parameters exist but are unused.
With `chunk_starts` (chunk-causal mode) both kinds become block-causal over chunks: softmax queries see the keys of
their own and earlier chunks, the GDN backward scans and the backward taps of the short conv on K stay inside each
chunk, while the forward scans run over all frames.
Upstream quirks kept: the softmax main branch lets padded frames' (zeroed) keys take part in the softmax; the camera
softmax uses the scale 1/sqrt(128) of a head dim padded to 128 (or 256), as the released model was trained with.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.models.sana_wm import chunks, ucpe
from sanawm_jax.models.sana_wm.layers import (
    RMSNorm,
    TemporalShortConv,
    apply_rope,
    dense,
)
from sanawm_jax.ops.attention import dot_product_attention
from sanawm_jax.ops.gdn import frame_gdn

Dtype = Any
GDN_EPS = 1e-8


def padded_head_dim(head_dim: int) -> int:
    """Head dim the released camera softmax ran at (flash-attention sizes): 32/64/128/256 kept, else 128 or 256."""
    if head_dim in (32, 64, 128, 256) or head_dim >= 256:
        return head_dim
    return 128 if head_dim <= 128 else 256


def a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
    """Inverse softplus of dt ~ log-uniform(dt_min, dt_max)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def frame_gdn_op(impl: str):
    """The GDN recurrence implementation named by `SanaWMConfig.gdn_impl` (same signature as `ops.gdn.frame_gdn`)."""
    if impl == "pallas":
        from pallas_kernels.frame_gdn import frame_gdn_pallas

        return frame_gdn_pallas
    return frame_gdn


def per_token(token_mask, tokens_per_frame):
    """(B, T, 1, 1) frame mask -> (B, T*S, 1, 1) token mask."""
    return jnp.repeat(token_mask[:, :, 0], tokens_per_frame, axis=1)[:, :, None]


class DualBranchAttention(nn.Module):
    """(B, T, S, C) tokens -> (B, T, S, C). `kind` is "gdn" or "softmax"."""

    kind: str
    num_heads: int
    grid: tuple[int, int, int]
    conv_kernel_size: int = 4
    qk_norm: bool = True
    attention_impl: str = "xla"
    gdn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    chunk_starts: tuple[int, ...] | None = None

    def norm(self, name):
        return RMSNorm(1e-5, self.dtype, self.param_dtype, name=name) if self.qk_norm else (lambda x: x)

    @nn.compact
    def __call__(self, x, rope, transforms: ucpe.RayTransforms | None, frame_mask=None):
        """rope: (N, D/2) angles; transforms: UCPE ray transforms or None (no camera branch); frame_mask: (B, T)."""
        b, t, s, c = x.shape
        n, h, d = t * s, self.num_heads, c // self.num_heads
        lin = lambda features, name, bias=True: dense(features, name, self.dtype, self.param_dtype, bias)
        gdn = self.kind == "gdn"

        # The gate parameters exist in both kinds (one checkpoint layout); only GDN blocks read them.
        gate_inputs = (x, jnp.mean(x, axis=2)) if gdn else (jnp.zeros((1, c), self.dtype),) * 2
        beta_logits = lin(h, "beta_proj")(gate_inputs[0])
        gate_logits = lin(h, "gate_proj")(gate_inputs[1])
        a_log = self.param("A_log", a_log_init, (h,), self.param_dtype)
        dt_bias = self.param("dt_bias", dt_bias_init, (h,), self.param_dtype)

        token_mask = None if frame_mask is None else frame_mask.astype(x.dtype)[:, :, None, None]
        masked = (lambda a: a) if token_mask is None else (lambda a: a * token_mask)
        as_heads = lambda a: a.reshape(b, n, h, d)

        hidden = masked(x)
        query, key, value = (masked(a) for a in jnp.split(lin(3 * c, "qkv", bias=False)(hidden), 3, axis=-1))
        if gdn:
            key = TemporalShortConv(self.conv_kernel_size, self.param_dtype, self.chunk_starts, name="conv_k")(key)
        query, key = self.norm("q_norm")(query), self.norm("k_norm")(key)
        query, key, value = as_heads(query), as_heads(key), as_heads(value)

        if gdn:
            beta, decay = self.gates(beta_logits, gate_logits, a_log, dt_bias, frame_mask)
            out = self.main_gdn(nn.relu(query), nn.relu(key), value, beta, decay, rope, token_mask)
        else:
            out = self.main_softmax(query, key, value, rope, token_mask)

        if transforms is not None:
            query_cam = masked(lin(c, "q_proj_cam")(hidden))
            key_cam = masked(lin(c, "k_proj_cam")(hidden))
            value_cam = masked(lin(c, "v_proj_cam")(hidden))
            if gdn:
                key_cam = TemporalShortConv(self.conv_kernel_size, self.param_dtype, self.chunk_starts, name="conv_k_cam")(key_cam)
            query_cam, key_cam = self.norm("q_norm_cam")(query_cam), self.norm("k_norm_cam")(key_cam)
            query_cam, key_cam, value_cam = as_heads(query_cam), as_heads(key_cam), as_heads(value_cam)
            if gdn:
                cam = self.camera_gdn(nn.relu(query_cam), nn.relu(key_cam), value_cam, beta, decay, transforms, frame_mask)
            else:
                cam = self.camera_softmax(query_cam, key_cam, value_cam, transforms, frame_mask)
            out = out + lin(c, "out_proj_cam")(cam.reshape(b, t, s, c))
        else:
            # Declare the camera parameters so the tree is the same with and without camera inputs (the dummy
            # calls have unused results, which jit removes).
            for name in ("q_proj_cam", "k_proj_cam", "v_proj_cam", "out_proj_cam"):
                lin(c, name)(jnp.zeros((1, c), self.dtype))
            for name in ("q_norm_cam", "k_norm_cam"):
                self.norm(name)(jnp.zeros((1, c), self.dtype))
            if gdn:
                TemporalShortConv(self.conv_kernel_size, self.param_dtype, self.chunk_starts, name="conv_k_cam")(jnp.zeros((1, 1, 1, c)))

        gate = nn.silu(lin(c, "output_gate")(x).astype(jnp.float32))
        return lin(c, "proj")((out * gate).astype(self.dtype))

    def gates(self, beta_logits, gate_logits, a_log, dt_bias, frame_mask):
        """β (B, T, S, H) = sigmoid(beta_proj x); decay (B, T, H) = exp(-exp(A_log)·softplus(gate_proj(mean_s x)+dt)).
        Padded frames get β = 0 and decay = 1, so they neither write nor erase state."""
        beta = jax.nn.sigmoid(beta_logits.astype(jnp.float32))
        decay = jnp.exp(
            -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(gate_logits.astype(jnp.float32) + dt_bias)
        )
        if frame_mask is not None:
            valid = frame_mask.astype(jnp.float32)
            beta = beta * valid[:, :, None, None]
            decay = decay * valid[:, :, None] + (1.0 - valid[:, :, None])
        return beta, decay

    def gdn_kwargs(self, t):
        """Chunk-causal mode: the backward scans reset at chunk starts."""
        if self.chunk_starts is None:
            return {}
        return {"chunk_starts": jnp.asarray(chunks.start_mask(self.chunk_starts, t))}

    def softmax_segments(self, t, s):
        """Chunk-causal mode: per-token chunk ids of queries and keys (block-causal softmax), else None."""
        if self.chunk_starts is None:
            return None
        ids = jnp.asarray(chunks.chunk_ids(self.chunk_starts, t).repeat(s))
        return ids, ids

    def key_scale(self, s, d):
        return (d**-0.5) * (s**-0.5)

    def main_gdn(self, query, key, value, beta, decay, rope, token_mask):
        """(B, N, H, D) ReLU'd q/k and v -> (B, T, S, C): RoPE on the numerator stream only."""
        b, t, s, h = beta.shape
        d = query.shape[-1]
        heads_mask = (lambda a: a) if token_mask is None else (lambda a: a * per_token(token_mask, s))
        key = key * self.key_scale(s, d)
        query, key, value = heads_mask(query), heads_mask(key), heads_mask(value)
        query_rot, key_rot = heads_mask(apply_rope(query, rope)), heads_mask(apply_rope(key, rope))
        frames = lambda a: a.astype(jnp.float32).reshape(b, t, s, h, d)
        out = frame_gdn_op(self.gdn_impl)(
            frames(query_rot), frames(key_rot), frames(value), beta, decay, frames(query), frames(key), eps=GDN_EPS,
            **self.gdn_kwargs(t),
        ).astype(value.dtype)
        out = out.reshape(b, t, s, h * d)
        return out if token_mask is None else out * token_mask

    def camera_gdn(self, query, key, value, beta, decay, transforms, frame_mask):
        """Numerator-only GDN in UCPE ray space; β discounted by the per-frame mean key-norm inflation of UCPE."""
        b, n, h, d = query.shape
        t = beta.shape[1]
        s = n // t
        key = key * self.key_scale(s, d)
        pre_norm = jnp.maximum(jnp.linalg.norm(key.astype(jnp.float32), axis=-1), 1e-6)
        query_u, key_u, value_u = ucpe.encode(query, key, value, transforms)
        post_norm = jnp.maximum(jnp.linalg.norm(key_u, axis=-1), 1e-6)
        inflation = jnp.mean(jnp.square(post_norm / pre_norm).reshape(b, t, s, h), axis=2)
        beta = beta / jnp.maximum(inflation, 1.0)[:, :, None, :]
        frames = lambda a: a.reshape(b, t, s, h, d)
        if frame_mask is not None:
            token_valid = frame_mask.astype(jnp.float32)[:, :, None, None, None]
            frames = lambda a: a.reshape(b, t, s, h, d) * token_valid
        out = frame_gdn_op(self.gdn_impl)(
            frames(query_u), frames(key_u), frames(value_u), beta, decay, **self.gdn_kwargs(t)
        ).astype(value.dtype)
        out = ucpe.decode(frames(out).reshape(b, n, h, d), transforms)
        return frames(out).astype(self.dtype)

    def main_softmax(self, query, key, value, rope, token_mask):
        b, n, h, d = query.shape
        heads_mask = (lambda a: a) if token_mask is None else (lambda a: a * per_token(token_mask, n // self.grid[0]))
        query, key, value = heads_mask(apply_rope(query, rope)), heads_mask(apply_rope(key, rope)), heads_mask(value)
        out = dot_product_attention(query, key, value, scale=d**-0.5, impl=self.attention_impl,
                                    segments=self.softmax_segments(self.grid[0], n // self.grid[0]))
        return out.reshape(b, self.grid[0], -1, h * d)

    def camera_softmax(self, query, key, value, transforms, frame_mask):
        b, n, h, d = query.shape
        query_u, key_u, value_u = ucpe.encode(query, key, value, transforms)
        key_mask = None
        token_valid = jnp.ones((b, n), jnp.float32)
        if frame_mask is not None:
            token_valid = jnp.repeat(frame_mask.astype(jnp.float32), n // frame_mask.shape[1], axis=1)
            query_u, value_u = query_u * token_valid[:, :, None, None], value_u * token_valid[:, :, None, None]
            key_mask = token_valid.astype(bool)[:, None, None, :]
        cast = lambda a: a.astype(self.dtype)
        out = dot_product_attention(
            cast(query_u), cast(key_u), cast(value_u),
            scale=padded_head_dim(d) ** -0.5, key_mask=key_mask, impl=self.attention_impl,
            segments=self.softmax_segments(self.grid[0], n // self.grid[0]),
        )
        out = ucpe.decode(out * token_valid[:, :, None, None].astype(out.dtype), transforms)
        return (out * token_valid[:, :, None, None]).astype(self.dtype)
