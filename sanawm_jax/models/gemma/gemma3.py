"""Gemma-3 decoder (the refiner's text encoder): token ids (B, L) -> every layer's hidden states (B, L, C, layers + 1).

Gemma-3 is Gemma-2's decoder (shared modules in `gemma2`) with these differences: per-head RMSNorms on queries and
keys before RoPE (`q_norm`, `k_norm`), no logit soft-capping, five sliding-window layers to one global layer
(`sliding_window_pattern` 6, the last of every six is global), and two RoPE tables: base `rope_local_base_freq` on
sliding layers and base `rope_theta` with "linear" scaling on global layers (Gemma-3-12B: 1e4, and 1e6 divided by 8).

The output stacks, as Hugging Face's `output_hidden_states` does, the scaled embeddings, the outputs of layers
0 .. n-2 and the final-normed output of the last layer. Positions are 0 .. L-1 whatever the padding (left padding
puts the prompt at positions pad .. L-1, as in Hugging Face).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sanawm_jax.dtypes import DtypePolicy
from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.models.gemma.gemma2 import (
    Gemma2DecoderLayer,
    Gemma2RMSNorm,
    decoder_checks,
    rotary_tables,
    scaled_embeddings,
    visibility_mask,
)

ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True)
class Gemma3Config(FrozenConfig, DtypePolicy):
    """Gemma-3 text architecture (Hugging Face field names; defaults are Hugging Face's `Gemma3TextConfig` ones).

    layer_types: one of gemma2.LAYER_TYPES per layer; empty means every `sliding_window_pattern`-th layer global.
    rope_scaling_factor: linear RoPE scaling of the global layers (1 = none).
    """

    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float = 1.0
    rope_local_base_freq: float = 10_000.0
    param_dtype: str = "float32"
    dtype: str = "float32"

    attn_logit_softcapping = None  # read by the shared attention module; Gemma-3 has none

    def __post_init__(self):
        if not self.layer_types:
            pattern = self.sliding_window_pattern
            default = tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                            for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.check(decoder_checks(self) + [(self.rope_scaling_factor >= 1.0, "rope_scaling_factor must be >= 1")]
                   + self.dtype_checks())

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32"):
        """Map a Hugging Face Gemma-3 `config.json` dict (`Gemma3ForConditionalGeneration`'s, whose `text_config`
        is read, or a bare `gemma3_text` one), old (`rope_scaling`, `rope_local_base_freq`) or new
        (`rope_parameters` per layer type) RoPE fields; refuses what this module does not implement."""
        if hf.get("model_type") == "gemma3":
            hf = {"model_type": "gemma3_text", **(hf.get("text_config") or {})}
        if hf.get("model_type") != "gemma3_text":
            raise ValueError(f"not a Gemma-3 config: model_type={hf.get('model_type')!r} "
                             "(expected 'gemma3' or 'gemma3_text')")
        full, sliding = rope_fields(hf)
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        unsupported = {
            "hidden_activation": (activation, activation == "gelu_pytorch_tanh"),
            "attention_bias": (hf.get("attention_bias"), not hf.get("attention_bias")),
            "attn_logit_softcapping": (hf.get("attn_logit_softcapping"), hf.get("attn_logit_softcapping") is None),
            "use_bidirectional_attention": (
                hf.get("use_bidirectional_attention"), not hf.get("use_bidirectional_attention")),
            "full_attention rope_type": (full.get("rope_type"), full.get("rope_type", "default") in ROPE_TYPES),
            "sliding_attention rope_type": (sliding.get("rope_type"), sliding.get("rope_type", "default") == "default"),
        }
        for key, (value, ok) in unsupported.items():
            if not ok:
                raise ValueError(f"unsupported Gemma-3 config: {key}={value!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {
            "rope_theta", "rope_scaling_factor", "rope_local_base_freq", "layer_types", "param_dtype", "dtype"}
        values = {name: hf[name] for name in names if hf.get(name) is not None}
        if "sliding_window" in hf:
            values["sliding_window"] = hf["sliding_window"]
        scaled = full.get("rope_type", "default") == "linear"
        return cls(**values, layer_types=tuple(hf.get("layer_types") or ()),
                   rope_theta=full.get("rope_theta", cls.rope_theta),
                   rope_scaling_factor=float(full["factor"]) if scaled else 1.0,
                   rope_local_base_freq=sliding.get("rope_theta", cls.rope_local_base_freq),
                   param_dtype=param_dtype, dtype=dtype)


def rope_fields(hf: dict[str, Any]) -> tuple[dict, dict]:
    """(global, sliding) RoPE parameter dicts from either config format."""
    parameters = hf.get("rope_parameters") or {}
    if "full_attention" in parameters or "sliding_attention" in parameters:
        return dict(parameters.get("full_attention") or {}), dict(parameters.get("sliding_attention") or {})
    full = {"rope_theta": hf.get("rope_theta", Gemma3Config.rope_theta), **(hf.get("rope_scaling") or {})}
    if "type" in full:
        full.setdefault("rope_type", full.pop("type"))
    sliding = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", Gemma3Config.rope_local_base_freq)}
    return full, sliding


class Gemma3Model(nn.Module):
    """input_ids (B, L) int, attention_mask (B, L) 0/1 (left or right padding) -> hidden-state stack
    (B, L, hidden_size, num_hidden_layers + 1) in the compute dtype."""

    config: Gemma3Config

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids must be (B, L) and attention_mask the same shape; got {input_ids.shape} and "
                             f"{attention_mask.shape}")
        x = scaled_embeddings(cfg, input_ids)
        positions = jnp.arange(input_ids.shape[1])
        tables = {
            "full_attention": rotary_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
            "sliding_attention": rotary_tables(positions, cfg.head_dim, cfg.rope_local_base_freq),
        }
        key_valid = attention_mask.astype(bool)
        masks = {
            "full_attention": visibility_mask(key_valid, None),
            "sliding_attention": visibility_mask(key_valid, cfg.sliding_window),
        }
        states = [x]
        for index, kind in enumerate(cfg.layer_types):
            x = Gemma2DecoderLayer(cfg, qk_norm=True, name=f"layers_{index}")(x, masks[kind], *tables[kind])
            states.append(x)
        states[-1] = Gemma2RMSNorm(cfg.rms_norm_eps, cfg.parameter_dtype, name="norm")(x)
        return jnp.stack(states, axis=-1)


GEMMA3_PRESETS = {
    # Gemma-3-12B (the refiner's `text_encoder` / `gemma3_12b` folders).
    "gemma3_12b": Gemma3Config(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, sliding_window=1024, rope_scaling_factor=8.0,
    ),
}
