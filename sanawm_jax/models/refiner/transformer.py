"""The stage-2 refiner transformer (LTX-2 video path) in Flax: video tokens (B, N, C_in) -> velocity (B, N, C_out).

Per block: RMSNorm -> adaLN modulation -> self-attention (RMS-normed q/k across heads, LTX-2 RoPE, optional per-head
gates) -> gated residual; RMSNorm -> text cross-attention -> residual; RMSNorm -> modulation -> GELU(tanh) MLP -> gated
residual. Timesteps are per token, so the modulation is per token: (B, N, 6, C).

Self-attention can read a per-layer K/V prefix (the chunk-causal refiner's attention sink and refined history) and
return this forward's K/V, before or after RoPE, for the caller to cache; see `RefinerTransformer.__call__`.
Parameter names follow the diffusers modules (`transformer_blocks_N/attn1/to_q/kernel`, ...).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.models.refiner.config import RefinerConfig
from sanawm_jax.models.refiner.rope import apply_rope
from sanawm_jax.models.sana_wm.layers import RMSNorm, dense, layer_norm, sinusoidal_timestep_embedding
from sanawm_jax.ops.attention import dot_product_attention
from sanawm_jax.ops.norm import rms_normalize

Dtype = Any
CAPTURE_MODES = (None, "pre_rope", "post_rope")


class KVPrefix(NamedTuple):
    """Per-layer K/V prepended to every self-attention's keys/values, all (layers, B, tokens, H*D) or None.

    sink_k is pre-RoPE and rotated by `sink_rope` inside the layer; history_k is already rotated. history_mask
    (B, history tokens) bool, or None for all valid, marks the history entries attended (a fixed-size window
    buffer holds zeros in its unused entries).
    """

    sink_k: jax.Array | None = None
    sink_v: jax.Array | None = None
    sink_rope: tuple | None = None
    history_k: jax.Array | None = None
    history_v: jax.Array | None = None
    history_mask: jax.Array | None = None

    def layer(self, index: int) -> "KVPrefix":
        pick = lambda a: None if a is None else a[index]
        return KVPrefix(pick(self.sink_k), pick(self.sink_v), self.sink_rope, pick(self.history_k),
                        pick(self.history_v), self.history_mask)

    def key_mask(self, num_keys: int):
        """(B, num_keys) bool over [sink, history, block] keys, or None when every key is attended."""
        if self.history_mask is None:
            return None
        batch, history = self.history_mask.shape
        sink = 0 if self.sink_k is None else self.sink_k.shape[-2]
        ones = lambda n: jnp.ones((batch, n), bool)
        return jnp.concatenate([ones(sink), self.history_mask, ones(num_keys - sink - history)], axis=1)


def plain_rms(x, eps: float):
    """RMSNorm without a scale, output in x.dtype."""
    return rms_normalize(x, eps).astype(x.dtype)


class MLP2(nn.Module):
    """Linear -> activation -> Linear (`linear_1`, `linear_2`): (..., C_in) -> (..., features)."""

    features: int
    activation: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.features, "linear_1", self.dtype, self.param_dtype)(x.astype(self.dtype))
        return dense(self.features, "linear_2", self.dtype, self.param_dtype)(self.activation(x))


class TimestepEmbedding(nn.Module):
    """diffusers PixArt-style combined embedding without size conditions: (...,) -> (..., C) (module `emb`)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps):
        sinusoid = sinusoidal_timestep_embedding(timesteps).astype(self.dtype)
        return MLP2(self.features, nn.silu, self.dtype, self.param_dtype, name="timestep_embedder")(sinusoid)


class AdaLayerNormSingle(nn.Module):
    """Timesteps (...,) -> (modulation (..., num_mod * C), embedded timestep (..., C))."""

    features: int
    num_mod: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps):
        embedded = TimestepEmbedding(self.features, self.dtype, self.param_dtype, name="emb")(timesteps)
        modulation = dense(self.num_mod * self.features, "linear", self.dtype, self.param_dtype)(nn.silu(embedded))
        return modulation, embedded


class FeedForward(nn.Module):
    """GELU(tanh) MLP with 4x expansion (`net_0/proj`, `net_2`): (..., C) -> (..., C)."""

    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        hidden = ProjWrapper(4 * width, self.use_bias, self.dtype, self.param_dtype, name="net_0")(x)
        return dense(width, "net_2", self.dtype, self.param_dtype, self.use_bias)(jax.nn.gelu(hidden, approximate=True))


class ProjWrapper(nn.Module):
    """A Linear under the name `proj` (diffusers' GELU module holds its projection there)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.features, "proj", self.dtype, self.param_dtype, self.use_bias)(x)


class LTX2Attention(nn.Module):
    """LTX-2 attention: q/k/v projections, q/k RMSNorm across heads, RoPE (self-attention), optional per-head gates.

    __call__(x (B, N, C), context (B, L, C_ctx) or None, rope, key_mask (B, L) bool or None, prefix: KVPrefix of one
    layer) -> (out (B, N, C), (k_pre, k_post, v) each (B, N or L, H*D)).
    """

    heads: int
    head_dim: int
    use_bias: bool = True
    out_bias: bool = True
    gated: bool = False
    rope_type: str = "interleaved"
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, rope=None, key_mask=None, prefix: KVPrefix | None = None):
        inner = self.heads * self.head_dim
        source = x if context is None else context
        project = lambda name, features=inner, bias=self.use_bias: dense(features, name, self.dtype,
                                                                         self.param_dtype, bias)
        norm = lambda name: RMSNorm(self.eps, self.dtype, self.param_dtype, name=name)
        query = norm("norm_q")(project("to_q")(x))
        key_pre = norm("norm_k")(project("to_k")(source))
        value = project("to_v")(source)
        key = key_pre
        if rope is not None:
            query, key = apply_rope(query, rope, self.rope_type), apply_rope(key_pre, rope, self.rope_type)
        keys, values = [key], [value]
        if prefix is not None and prefix.history_k is not None:
            keys.insert(0, prefix.history_k.astype(key.dtype))
            values.insert(0, prefix.history_v.astype(value.dtype))
        if prefix is not None and prefix.sink_k is not None:
            keys.insert(0, apply_rope(prefix.sink_k.astype(key.dtype), prefix.sink_rope, self.rope_type))
            values.insert(0, prefix.sink_v.astype(value.dtype))
        all_keys, all_values = jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
        b, n, _ = query.shape
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)
        if prefix is not None and prefix.history_mask is not None:
            key_mask = prefix.key_mask(all_keys.shape[1])
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = dot_product_attention(split(query), split(all_keys), split(all_values), scale=self.head_dim**-0.5,
                                    key_mask=mask)
        if self.gated:
            gates = 2.0 * jax.nn.sigmoid(project("to_gate_logits", self.heads, True)(x))
            out = out * gates[..., None].astype(out.dtype)
        out = dense(x.shape[-1], "to_out_0", self.dtype, self.param_dtype, self.out_bias)(out.reshape(b, n, inner))
        return out, (key_pre, key, value)


class RefinerBlock(nn.Module):
    """One video block: (x (B, N, C), text (B, L, C), temb (B, N, 6C), rope, text_mask, prefix) -> (x, kv)."""

    config: RefinerConfig

    @nn.compact
    def __call__(self, x, text, temb, rope, text_mask, prefix):
        cfg = self.config
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim**-0.5), (6, cfg.inner_dim),
                           param_dtype)
        mod = table.astype(temb.dtype) + temb.reshape(*temb.shape[:2], 6, cfg.inner_dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, :, i] for i in range(6))

        def attention(name):
            return LTX2Attention(cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias,
                                 cfg.attention_out_bias, cfg.gated_attn, cfg.rope_type, 1e-6, dtype, param_dtype,
                                 name=name)

        normed = plain_rms(x, cfg.norm_eps) * (1 + scale_msa) + shift_msa
        attended, kv = attention("attn1")(normed, rope=rope, prefix=prefix)
        x = x + attended * gate_msa
        attended, _ = attention("attn2")(plain_rms(x, cfg.norm_eps), context=text, key_mask=text_mask)
        x = x + attended
        normed = plain_rms(x, cfg.norm_eps) * (1 + scale_mlp) + shift_mlp
        x = x + FeedForward(cfg.ff_bias, dtype, param_dtype, name="ff")(normed) * gate_mlp
        return x, kv


class RefinerTransformer(nn.Module):
    """The refiner's video forward over one block of latent tokens.

    __call__(tokens (B, N, C_in), text (B, L, caption_channels), timesteps (B, N) already multiplied by
    timestep_scale_multiplier, rope: (cos, sin) tables of the N tokens (`rope.rope_tables`), text_mask (B, L) 0/1 or
    None, prefix: KVPrefix or None, capture: None | "pre_rope" | "post_rope")
    -> velocity (B, N, C_out), or (velocity, (keys, values)) each (layers, B, N, H*D) when capturing.
    """

    config: RefinerConfig

    @nn.compact
    def __call__(self, tokens, text, timesteps, rope, text_mask=None, prefix: KVPrefix | None = None,
                 capture: str | None = None):
        cfg = self.config
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        x = dense(cfg.inner_dim, "proj_in", dtype, param_dtype)(tokens.astype(dtype))
        temb, embedded = AdaLayerNormSingle(cfg.inner_dim, 6, dtype, param_dtype, name="time_embed")(timesteps)
        text = MLP2(cfg.inner_dim, lambda h: jax.nn.gelu(h, approximate=True), dtype, param_dtype,
                    name="caption_projection")(text)
        key_mask = None if text_mask is None else text_mask.astype(bool)
        captured_k, captured_v = [], []
        for index in range(cfg.num_layers):
            layer_prefix = None if prefix is None else prefix.layer(index)
            x, (key_pre, key_post, value) = RefinerBlock(cfg, name=f"transformer_blocks_{index}")(
                x, text, temb, rope, key_mask, layer_prefix)
            captured_k.append(key_pre if capture == "pre_rope" else key_post)
            captured_v.append(value)
        table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim**-0.5), (2, cfg.inner_dim),
                           param_dtype)
        shift = table[0].astype(embedded.dtype) + embedded
        scale = table[1].astype(embedded.dtype) + embedded
        x = layer_norm(x, 1e-6) * (1 + scale) + shift
        out = dense(cfg.out_channels, "proj_out", dtype, param_dtype)(x)
        if capture is None:
            return out
        return out, (jnp.stack(captured_k), jnp.stack(captured_v))
