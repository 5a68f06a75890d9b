"""Dual-branch self-attention of a SANA-WM block: a main branch (RoPE) plus a camera branch (UCPE), summed, gated
by SiLU(output_gate(x)) and projected.

Two kinds share one parameter layout:
  "gdn":     bidirectional frame-level Gated DeltaNet in both branches (ReLU kernels, short conv on K,
             per-token β and per-frame decay gates); the camera branch runs the numerator-only recurrence.
  "softmax": full non-causal softmax attention in both branches; the GDN-only gate parameters exist but are unused.
With `chunk_starts` (chunk-causal mode) both kinds become block-causal over chunks: softmax queries see the keys of
their own and earlier chunks, the GDN backward scans and the backward taps of the short conv on K stay inside each
chunk, while the forward scans run over all frames. In streaming mode (`stream_config`) the layer runs one block with
a carried cache (`streaming.py`): the same computation as the chunk-causal mode on that block, given everything
before it.
Upstream quirks kept: the softmax main branch lets padded frames' (zeroed) keys take part in the softmax; the camera
softmax uses the scale 1/sqrt(128) of a head dim padded to 128 (or 256), as the released model was trained with.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.models.sana_wm import chunks, streaming, ucpe
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.layers import (
    GroupedDense,
    RMSNorm,
    TemporalShortConv,
    apply_rope,
    dense,
)
from sanawm_jax.ops.attention import dot_product_attention
from sanawm_jax.ops.context_parallel import ContextLayout, dot_product_attention_cp, frame_gdn_cp
from sanawm_jax.ops.gdn import GDNState, frame_gdn
from sanawm_jax.parallel import constrain

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
    """(B, T, S, C) tokens -> (B, T, S, C). `kind` is "gdn" or "softmax".

    stream_config (streaming mode): the model config whose chunk layout and key/value window the layer's cache
    follows; the call then takes this layer's cache and the block index and returns the updated cache too.
    """

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
    stream_config: SanaWMConfig | None = None
    context: ContextLayout | None = None  # frame-sharded tokens (context parallelism)

    def norm(self, name):
        return RMSNorm(1e-5, self.dtype, self.param_dtype, name=name) if self.qk_norm else (lambda x: x)

    @nn.compact
    def __call__(self, x, rope, transforms: ucpe.RayTransforms | None, frame_mask=None, cache=None, block=None):
        """rope: (N, D) rotary tables (`layers.rotary_tables`); transforms: UCPE ray transforms or None (no camera
        branch); frame_mask: (B, T).

        Streaming mode (`stream_config` set): x is one block, cache this layer's attention cache
        (`streaming.init_stream_state`), block its index (int32 scalar); returns (output, updated cache).
        """
        b, t, s, c = x.shape
        n, h, d = t * s, self.num_heads, c // self.num_heads
        lin = lambda features, name, bias=True: dense(features, name, self.dtype, self.param_dtype, bias)
        gdn = self.kind == "gdn"
        streaming = self.stream_config is not None
        new_cache = {}

        def short_conv(name, tokens):
            conv = TemporalShortConv(self.conv_kernel_size, self.param_dtype, self.chunk_starts, self.context,
                                     name=name)
            if not streaming:
                return conv(tokens)
            tokens, new_cache[name] = conv(tokens, cache[name])
            return tokens

        # The gate parameters exist in both kinds (one checkpoint layout); only GDN blocks read them.
        gate_inputs = (x, jnp.mean(x, axis=2)) if gdn else (jnp.zeros((1, c), self.dtype),) * 2
        beta_logits = lin(h, "beta_proj")(gate_inputs[0])
        gate_logits = lin(h, "gate_proj")(gate_inputs[1])
        a_log = self.param("A_log", a_log_init, (h,), self.param_dtype)
        dt_bias = self.param("dt_bias", dt_bias_init, (h,), self.param_dtype)

        token_mask = None if frame_mask is None else frame_mask.astype(x.dtype)[:, :, None, None]
        masked = (lambda a: a) if token_mask is None else (lambda a: a * token_mask)
        as_heads = lambda a: constrain(a.reshape(b, n, h, d), ("batch", "sequence", "act_heads", "act_kv"))

        hidden = masked(x)
        qkv = GroupedDense(3, h, d, "heads", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="qkv")(hidden)
        qkv = constrain(qkv, ("batch", "frames", "tokens", None, "act_heads", "act_kv"))
        query, key, value = (masked(qkv[..., i, :, :].reshape(b, t, s, c)) for i in range(3))
        if gdn:
            key = short_conv("conv_k", key)
        query, key = self.norm("q_norm")(query), self.norm("k_norm")(key)
        query, key, value = as_heads(query), as_heads(key), as_heads(value)

        if gdn:
            beta, decay = self.gates(beta_logits, gate_logits, a_log, dt_bias, frame_mask)
            out, new_cache["main"] = self.main_gdn(nn.relu(query), nn.relu(key), value, beta, decay, rope, token_mask,
                                                   cache["main"] if streaming else None)
        else:
            out, kv = self.main_softmax(query, key, value, rope, token_mask, cache, block)
            if streaming:
                new_cache["key"], new_cache["value"] = kv

        if transforms is not None:
            query_cam = masked(lin(c, "q_proj_cam")(hidden))
            key_cam = masked(lin(c, "k_proj_cam")(hidden))
            value_cam = masked(lin(c, "v_proj_cam")(hidden))
            if gdn:
                key_cam = short_conv("conv_k_cam", key_cam)
            query_cam, key_cam = self.norm("q_norm_cam")(query_cam), self.norm("k_norm_cam")(key_cam)
            query_cam, key_cam, value_cam = as_heads(query_cam), as_heads(key_cam), as_heads(value_cam)
            if gdn:
                cam, new_cache["camera"] = self.camera_gdn(nn.relu(query_cam), nn.relu(key_cam), value_cam, beta,
                                                           decay, transforms, frame_mask,
                                                           cache["camera"] if streaming else None)
            else:
                cam, kv = self.camera_softmax(query_cam, key_cam, value_cam, transforms, frame_mask, cache, block)
                if streaming:
                    new_cache["key_cam"], new_cache["value_cam"] = kv
            out = out + lin(c, "out_proj_cam")(cam.reshape(b, t, s, c))
        else:
            # Declare the camera parameters so the tree is the same with and without camera inputs (the dummy
            # calls have unused results, which jit removes).
            for name in ("q_proj_cam", "k_proj_cam", "v_proj_cam", "out_proj_cam"):
                lin(c, name)(jnp.zeros((1, c), self.dtype))
            for name in ("q_norm_cam", "k_norm_cam"):
                self.norm(name)(jnp.zeros((1, c), self.dtype))
            if gdn:
                TemporalShortConv(self.conv_kernel_size, self.param_dtype, name="conv_k_cam")(jnp.zeros((1, 1, 1, c)))

        gate = nn.silu(lin(c, "output_gate")(x).astype(jnp.float32))
        out = lin(c, "proj")((out * gate).astype(self.dtype))
        return (out, new_cache) if streaming else out

    def gdn_op(self):
        """The frame-level GDN recurrence (`ops.gdn.frame_gdn`'s signature), across devices under context
        parallelism."""
        op = frame_gdn_op(self.gdn_impl)
        return op if self.context is None else functools.partial(frame_gdn_cp, self.context, op)

    def attend(self, *args, **kwargs):
        """`ops.attention.dot_product_attention`, across devices under context parallelism."""
        if self.context is None:
            return dot_product_attention(*args, **kwargs)
        return dot_product_attention_cp(self.context, *args, **kwargs)

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

    def scan_kwargs(self, t, state):
        """Keyword arguments of the GDN op: chunk-causal backward resets, or (streaming) the carried forward state
        and a zero backward state, since the block is one chunk."""
        if state is None:
            return self.gdn_kwargs(t)
        return {"initial_state": GDNState(state, jax.tree.map(jnp.zeros_like, state)), "return_final_state": True}

    def main_gdn(self, query, key, value, beta, decay, rope, token_mask, state=None):
        """(B, N, H, D) ReLU'd q/k and v -> ((B, T, S, C), final forward ScanState or None): RoPE on the numerator
        stream only. state: the carried forward ScanState (streaming mode) or None."""
        b, t, s, h = beta.shape
        d = query.shape[-1]
        heads_mask = (lambda a: a) if token_mask is None else (lambda a: a * per_token(token_mask, s))
        key = key * self.key_scale(s, d)
        query, key, value = heads_mask(query), heads_mask(key), heads_mask(value)
        query_rot, key_rot = heads_mask(apply_rope(query, rope)), heads_mask(apply_rope(key, rope))
        frames = lambda a: a.astype(jnp.float32).reshape(b, t, s, h, d)
        out = self.gdn_op()(
            frames(query_rot), frames(key_rot), frames(value), beta, decay, frames(query), frames(key), eps=GDN_EPS,
            **self.scan_kwargs(t, state),
        )
        out, final = out if state is not None else (out, None)
        out = out.astype(value.dtype).reshape(b, t, s, h * d)
        return (out if token_mask is None else out * token_mask), None if final is None else final.forward

    def camera_gdn(self, query, key, value, beta, decay, transforms, frame_mask, state=None):
        """Numerator-only GDN in UCPE ray space; β discounted by the per-frame mean key-norm inflation of UCPE.
        Returns (output, final forward ScanState or None) as `main_gdn`."""
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
        out = self.gdn_op()(
            frames(query_u), frames(key_u), frames(value_u), beta, decay, **self.scan_kwargs(t, state)
        )
        out, final = out if state is not None else (out, None)
        out = ucpe.decode(frames(out.astype(value.dtype)).reshape(b, n, h, d), transforms)
        return frames(out).astype(self.dtype), None if final is None else final.forward

    def attend_with_cache(self, query, key, value, scale, cache, names, block):
        """Streaming softmax: the block's queries attend to the cached keys of the window and to its own keys.
        Returns (output (B, N, H, D), (cache with the block's keys, cache with its values))."""
        config = self.stream_config
        t, s = self.grid[0], self.grid[1] * self.grid[2]
        first = streaming.is_first_block(config, t)
        cached_key, cached_value = cache[names[0]], cache[names[1]]
        key_mask = jnp.concatenate([streaming.cached_key_mask(config, s, block), jnp.ones((t * s,), bool)])
        out = dot_product_attention(
            query, jnp.concatenate([cached_key, key.astype(cached_key.dtype)], axis=1),
            jnp.concatenate([cached_value, value.astype(cached_value.dtype)], axis=1),
            scale=scale, key_mask=key_mask[None, None, None, :], impl=self.attention_impl,
        )
        written = tuple(streaming.write_block(config, c, new, block, first)
                        for c, new in ((cached_key, key), (cached_value, value)))
        return out, written

    def main_softmax(self, query, key, value, rope, token_mask, cache=None, block=None):
        """Returns ((B, T, S, C), (key cache, value cache) in streaming mode else None)."""
        b, n, h, d = query.shape
        heads_mask = (lambda a: a) if token_mask is None else (lambda a: a * per_token(token_mask, n // self.grid[0]))
        query, key, value = heads_mask(apply_rope(query, rope)), heads_mask(apply_rope(key, rope)), heads_mask(value)
        written = None
        if self.stream_config is not None:
            out, written = self.attend_with_cache(query, key, value, d**-0.5, cache, ("key", "value"), block)
        else:
            out = self.attend(query, key, value, scale=d**-0.5, impl=self.attention_impl,
                              segments=self.softmax_segments(self.grid[0], n // self.grid[0]))
        return out.reshape(b, self.grid[0], -1, h * d), written

    def camera_softmax(self, query, key, value, transforms, frame_mask, cache=None, block=None):
        """Returns (output, (key cache, value cache) in streaming mode else None); the cache holds post-UCPE keys
        and values."""
        b, n, h, d = query.shape
        query_u, key_u, value_u = ucpe.encode(query, key, value, transforms)
        key_mask = None
        token_valid = jnp.ones((b, n), jnp.float32)
        if frame_mask is not None:
            token_valid = jnp.repeat(frame_mask.astype(jnp.float32), n // frame_mask.shape[1], axis=1)
            query_u, value_u = query_u * token_valid[:, :, None, None], value_u * token_valid[:, :, None, None]
            key_mask = token_valid.astype(bool)[:, None, None, :]
        cast = lambda a: a.astype(self.dtype)
        scale = padded_head_dim(d) ** -0.5
        written = None
        if self.stream_config is not None:
            out, written = self.attend_with_cache(cast(query_u), cast(key_u), cast(value_u), scale, cache,
                                                  ("key_cam", "value_cam"), block)
        else:
            out = self.attend(
                cast(query_u), cast(key_u), cast(value_u), scale=scale, key_mask=key_mask, impl=self.attention_impl,
                segments=self.softmax_segments(self.grid[0], n // self.grid[0]),
            )
        out = ucpe.decode(out * token_valid[:, :, None, None].astype(out.dtype), transforms)
        return (out * token_valid[:, :, None, None]).astype(self.dtype), written
