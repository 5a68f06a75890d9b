"""Gemma-2 decoder (the stage-1 text encoder): token ids (B, L) -> last hidden states (B, L, hidden_size).

Architecture: embeddings scaled by sqrt(hidden_size); per layer, pre- and post-norms around causal grouped-query
attention (RoPE, logits scaled by query_pre_attn_scalar^-1/2 and soft-capped by c*tanh(x/c), a sliding window on
"sliding_attention" layers) and around a GeGLU MLP (gelu-tanh); a final RMSNorm. Every RMSNorm scales by (1 + weight).
Norm statistics and softmax run in float32, matmuls in the configured compute dtype.

Parameter names follow the Hugging Face module names (`layers_N/self_attn/q_proj/kernel`, `.../input_layernorm/scale`)
so checkpoints convert by a fixed rule (see `sanawm_jax.models.gemma.checkpoint`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.dtypes import DtypePolicy
from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.ops.norm import rms_normalize

LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATION = "gelu_pytorch_tanh"
Dtype = Any


def decoder_checks(cfg) -> list[tuple[bool, str]]:
    """The (condition, message) checks every Gemma decoder config shares (layer types, head grouping, RoPE pairs,
    window)."""
    return [
        (len(cfg.layer_types) == cfg.num_hidden_layers, "layer_types needs one entry per layer"),
        (all(kind in LAYER_TYPES for kind in cfg.layer_types), f"layer_types entries must be in {LAYER_TYPES}"),
        (cfg.num_attention_heads % cfg.num_key_value_heads == 0,
         "num_attention_heads must be a multiple of num_key_value_heads"),
        (cfg.head_dim % 2 == 0, "head_dim must be even (rotary pairs)"),
        (cfg.sliding_window is None or cfg.sliding_window > 0, "sliding_window must be positive or None"),
    ]


@dataclasses.dataclass(frozen=True)
class Gemma2Config(FrozenConfig, DtypePolicy):
    """Gemma-2 architecture (Hugging Face field names; defaults are Gemma-2-2B's) plus our numerics policy.

    layer_types: one of LAYER_TYPES per layer; empty means Hugging Face's default (even layers sliding, odd global).
    sliding_window: keys visible to a query on sliding layers (itself included); None disables the window.
    param_dtype / dtype: parameter storage and matmul compute dtype ("float32", "bfloat16").
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if not self.layer_types:
            default = tuple(LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.check(decoder_checks(self) + self.dtype_checks())

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32"):
        """Map a Hugging Face Gemma-2 `config.json` dict; absent fields take Hugging Face's defaults.

        Rejects settings this module does not implement (other activations, attention biases, bidirectional
        attention, scaled RoPE variants).
        """
        if hf.get("model_type") != "gemma2":
            raise ValueError(f"not a Gemma-2 config: model_type={hf.get('model_type')!r} (expected 'gemma2')")
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        unsupported = {
            "hidden_activation": (activation, activation == ACTIVATION),
            "attention_bias": (hf.get("attention_bias"), not hf.get("attention_bias")),
            "use_bidirectional_attention": (
                hf.get("use_bidirectional_attention"), not hf.get("use_bidirectional_attention")),
            "rope_parameters.rope_type": (rope_type, rope_type == "default"),
            "rope_scaling": (hf.get("rope_scaling"), not hf.get("rope_scaling")),
        }
        for key, (value, ok) in unsupported.items():
            if not ok:
                raise ValueError(f"unsupported Gemma-2 config: {key}={value!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "layer_types", "param_dtype", "dtype"}
        values = {name: hf[name] for name in names if name in hf}
        values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta))
        values["layer_types"] = tuple(hf.get("layer_types") or ())
        return cls(**values, param_dtype=param_dtype, dtype=dtype)




class Gemma2RMSNorm(nn.Module):
    """RMSNorm scaling by (1 + scale) (scale initialised to zero); float32 statistics, output in x.dtype."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return (rms_normalize(x, self.eps) * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rotary_tables(positions, head_dim: int, theta: float, scaling: float = 1.0):
    """positions (L,) -> cos, sin (L, head_dim) in float32, frequencies repeated over the two halves; `scaling` > 1
    divides the frequencies (Hugging Face's "linear" RoPE scaling)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling != 1.0:
        inv_freq = inv_freq / scaling
    angles = positions.astype(jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """x (B, L, H, D) rotated by pairs (i, i + D/2); cos/sin (L, D)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def visibility_mask(key_valid, sliding_window: int | None):
    """key_valid (B, L) bool -> (B, L, L) bool: query q sees key k if k <= q, k is valid and, with a window w,
    k > q - w. Padded queries keep their causal rows, as in Hugging Face."""
    length = key_valid.shape[1]
    q_index = jnp.arange(length)[:, None]
    k_index = jnp.arange(length)[None, :]
    visible = k_index <= q_index
    if sliding_window is not None:
        visible = visible & (k_index > q_index - sliding_window)
    return visible[None] & key_valid[:, None, :]


class Gemma2Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE and tanh soft-capped logits: (B, L, C) -> (B, L, C).

    qk_norm: Gemma-3's per-head RMSNorms (`q_norm`, `k_norm`, scaling by 1 + weight) on queries and keys before RoPE.
    The config needs the fields of `Gemma2Config` used here (Gemma-3's config has them).
    """

    config: Any
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.config
        b, length, _ = x.shape
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def project(features, name):
            return nn.Dense(
                features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name
            )

        query = project(heads * d, "q_proj")(x).reshape(b, length, heads, d)
        key = project(kv_heads * d, "k_proj")(x).reshape(b, length, kv_heads, d)
        value = project(kv_heads * d, "v_proj")(x).reshape(b, length, kv_heads, d)
        if self.qk_norm:
            query = Gemma2RMSNorm(cfg.rms_norm_eps, cfg.parameter_dtype, name="q_norm")(query)
            key = Gemma2RMSNorm(cfg.rms_norm_eps, cfg.parameter_dtype, name="k_norm")(key)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

        query = query.reshape(b, length, kv_heads, heads // kv_heads, d)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", query, key, preferred_element_type=jnp.float32)
        logits = logits * cfg.query_pre_attn_scalar**-0.5
        if cfg.attn_logit_softcapping is not None:
            logits = cfg.attn_logit_softcapping * jnp.tanh(logits / cfg.attn_logit_softcapping)
        # The float32 minimum (not -inf) as Hugging Face does: a query with no visible key averages all values.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, value).reshape(b, length, heads * d)
        return project(cfg.hidden_size, "o_proj")(out)


class Gemma2MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), (B, L, C) -> (B, L, C)."""

    config: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def project(features, name):
            return nn.Dense(
                features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name
            )

        hidden = jax.nn.gelu(project(cfg.intermediate_size, "gate_proj")(x), approximate=True)
        hidden = hidden * project(cfg.intermediate_size, "up_proj")(x)
        return project(cfg.hidden_size, "down_proj")(hidden)


class Gemma2DecoderLayer(nn.Module):
    """x + post_norm(attn(pre_norm(x))), then the same sandwich around the MLP: (B, L, C) -> (B, L, C)."""

    config: Any
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.config

        def norm(name):
            return Gemma2RMSNorm(cfg.rms_norm_eps, cfg.parameter_dtype, name=name)

        attended = Gemma2Attention(cfg, self.qk_norm, name="self_attn")(norm("input_layernorm")(x), mask, cos, sin)
        x = x + norm("post_attention_layernorm")(attended)
        transformed = Gemma2MLP(cfg, name="mlp")(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(transformed)


def scaled_embeddings(cfg, input_ids):
    """Token embeddings (module `embed_tokens`, called inside a compact method) times sqrt(hidden_size) rounded to
    the parameter dtype first, as in Hugging Face: (B, L) -> (B, L, hidden_size) in the compute dtype."""
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.parameter_dtype, param_dtype=cfg.parameter_dtype,
                     name="embed_tokens")
    return (embed(input_ids) * jnp.asarray(cfg.hidden_size**0.5, cfg.parameter_dtype)).astype(cfg.compute_dtype)


class Gemma2Model(nn.Module):
    """input_ids (B, L) int, attention_mask (B, L) 0/1 or bool (right padding) -> hidden states (B, L, hidden_size)
    after the final norm, in the compute dtype."""

    config: Gemma2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids must be (B, L) and attention_mask the same shape; got {input_ids.shape} and "
                f"{attention_mask.shape}"
            )
        x = scaled_embeddings(cfg, input_ids)

        cos, sin = rotary_tables(jnp.arange(input_ids.shape[1]), cfg.head_dim, cfg.rope_theta)
        key_valid = attention_mask.astype(bool)
        masks = {
            "full_attention": visibility_mask(key_valid, None),
            "sliding_attention": visibility_mask(key_valid, cfg.sliding_window),
        }
        for index, kind in enumerate(cfg.layer_types):
            x = Gemma2DecoderLayer(cfg, name=f"layers_{index}")(x, masks[kind], cos, sin)
        return Gemma2RMSNorm(cfg.rms_norm_eps, cfg.parameter_dtype, name="norm")(x)
