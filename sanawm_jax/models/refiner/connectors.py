"""The refiner's text path after Gemma-3: the per-layer normalisation of the hidden-state stack and LTX-2's text
connectors (`LTX2TextConnectors`, video connector only).

`normalize_text_states`: for each prompt and each encoder layer, the valid (left-padded: the last `length`) tokens
are centred by their mean and divided by their range (max - min) over tokens and channels, times 8; padded tokens are
zero. The layers are then flattened channel-major: (B, L, C, F) -> (B, L, C * F).

`TextConnectors`: normalise (again: the refiner pipeline passes states it already normalised, and the connectors
normalise their input), project to `caption_channels` (`text_proj_in`), then a 1D transformer (`video_connector`):
valid tokens moved to the front in order and the rest replaced by learnable registers (tiled by position), RoPE over
positions / `connector_rope_base_seq_len`, blocks of RMSNorm -> self-attention -> residual, RMSNorm -> GELU(tanh) MLP
-> residual, a final RMSNorm. With registers every token is attended; without, padded keys are masked. The mask
returned is all ones, as diffusers' conversion of the connector's additive mask yields for both valid and padded
tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.refiner.config import ConnectorsConfig
from sanawm_jax.models.refiner.rope import rope_tables
from sanawm_jax.models.refiner.transformer import FeedForward, LTX2Attention, plain_rms
from sanawm_jax.models.sana_wm.layers import dense

SCALE_FACTOR = 8.0
EPS = 1e-6


def left_padding_mask(lengths, length: int):
    """lengths (B,) -> (B, L) bool, True on the last `lengths[b]` positions."""
    return jnp.arange(length)[None, :] >= (length - lengths)[:, None]


def normalize_text_states(states, lengths):
    """states (B, L, C, F) left-padded, lengths (B,) valid tokens -> (B, L, C * F) in float32 (see module doc)."""
    batch, length, channels, _ = states.shape
    states = states.astype(jnp.float32)
    valid = left_padding_mask(lengths, length)[:, :, None, None]
    count = (lengths * channels).astype(jnp.float32)[:, None, None, None]
    mean = jnp.sum(jnp.where(valid, states, 0.0), axis=(1, 2), keepdims=True) / (count + EPS)
    low = jnp.min(jnp.where(valid, states, jnp.inf), axis=(1, 2), keepdims=True)
    high = jnp.max(jnp.where(valid, states, -jnp.inf), axis=(1, 2), keepdims=True)
    normalized = (states - mean) / (high - low + EPS) * SCALE_FACTOR
    return jnp.where(valid, normalized, 0.0).reshape(batch, length, -1)


class ConnectorBlock(nn.Module):
    """x + attn1(rms(x)), then x + ff(rms(x)): (B, L, C) -> (B, L, C)."""

    config: ConnectorsConfig

    @nn.compact
    def __call__(self, x, rope, key_mask):
        cfg = self.config
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        attended, _ = LTX2Attention(cfg.video_connector_num_attention_heads, cfg.video_connector_attention_head_dim,
                                    gated=cfg.video_gated_attn, rope_type=cfg.rope_type, dtype=dtype,
                                    param_dtype=param_dtype, name="attn1")(plain_rms(x, EPS), rope=rope,
                                                                           key_mask=key_mask)
        x = x + attended
        return x + FeedForward(True, dtype, param_dtype, name="ff")(plain_rms(x, EPS))


class VideoConnector(nn.Module):
    """Projected text (B, L, C), mask (B, L) bool -> (B, L, C)."""

    config: ConnectorsConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        batch, length, width = x.shape
        key_mask = mask
        registers = cfg.video_connector_num_learnable_registers
        if registers is not None:
            if length % registers:
                raise ValueError(f"text length {length} must be a multiple of the {registers} learnable registers")
            table = self.param("learnable_registers", nn.initializers.uniform(2.0), (registers, width),
                               cfg.parameter_dtype)
            order = jnp.argsort(~mask, axis=1, stable=True)
            front = jnp.take_along_axis(x, order[:, :, None], axis=1)
            filled = jnp.arange(length)[None, :] < jnp.sum(mask, axis=1, keepdims=True)
            tiled = jnp.tile(table.astype(x.dtype), (length // registers, 1))
            x = jnp.where(filled[:, :, None], front, tiled[None])
            key_mask = None
        positions = (np.arange(length, dtype=np.float32) / np.float32(cfg.connector_rope_base_seq_len))[:, None]
        rope = rope_tables(positions, cfg.inner_dim, cfg.rope_theta, cfg.rope_type,
                           cfg.video_connector_num_attention_heads)
        for index in range(cfg.video_connector_num_layers):
            x = ConnectorBlock(cfg, name=f"transformer_blocks_{index}")(x, rope, key_mask)
        return plain_rms(x, EPS)


class TextConnectors(nn.Module):
    """Text-encoder states (B, L, C * F) or (B, L, C, F), attention_mask (B, L) 0/1 left-padded
    -> (embeddings (B, L, caption_channels), mask (B, L) int32 of ones)."""

    config: ConnectorsConfig

    @nn.compact
    def __call__(self, states, attention_mask):
        cfg = self.config
        batch, length = attention_mask.shape
        if states.ndim == 3:
            states = states.reshape(batch, length, cfg.caption_channels, -1)
        lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=1)
        normalized = normalize_text_states(states, lengths).astype(cfg.compute_dtype)
        projected = dense(cfg.caption_channels, "text_proj_in", cfg.compute_dtype, cfg.parameter_dtype,
                          cfg.proj_bias)(normalized)
        out = VideoConnector(cfg, name="video_connector")(projected, attention_mask.astype(bool))
        return out, jnp.ones((batch, length), jnp.int32)
