"""Configuration of the stage-2 refiner: the LTX-2 video transformer (video path only) and its text connectors.

Field names follow the diffusers config of `SanaWMLTX2RefinerTransformer3DModel` / `LTX2TextConnectors`; the released
sizes are diffusers' defaults for those classes (the LTX-2 19B checkpoint layout: 48 layers of 32 x 128 heads, Gemma-3
12B states of 3840 channels over 49 hidden-state layers). Audio fields exist in the released config.json and are read
only to be ignored: no audio parameter is created.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sanawm_jax.dtypes import DtypePolicy
from sanawm_jax.frozen_config import FrozenConfig

ROPE_TYPES = ("interleaved", "split")


@dataclasses.dataclass(frozen=True)
class RefinerConfig(FrozenConfig, DtypePolicy):
    """The refiner transformer's video path.

    vae_scale_factors: (temporal, spatial, spatial) pixel strides of one latent, used by the RoPE coordinates.
    pos_embed_max_pos / base_height / base_width: RoPE normalisers of the (seconds, pixel, pixel) coordinates.
    timestep_scale_multiplier: sigma -> model timestep factor.
    """

    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    cross_attention_dim: int = 4096
    caption_channels: int = 3840
    num_layers: int = 48
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)
    pos_embed_max_pos: int = 20
    base_height: int = 2048
    base_width: int = 2048
    gated_attn: bool = False
    norm_eps: float = 1e-6
    attention_bias: bool = True
    attention_out_bias: bool = True
    ff_bias: bool = True
    rope_theta: float = 10000.0
    rope_type: str = "interleaved"
    causal_offset: int = 1
    timestep_scale_multiplier: int = 1000
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "vae_scale_factors", tuple(self.vae_scale_factors))
        self.check([
            (self.rope_type in ROPE_TYPES, f"rope_type must be one of {ROPE_TYPES}"),
            (self.patch_size == 1 and self.patch_size_t == 1, "only patch_size = patch_size_t = 1 is implemented"),
            (self.cross_attention_dim == self.inner_dim,
             "cross_attention_dim must equal num_attention_heads * attention_head_dim (text is projected to it)"),
            (len(self.vae_scale_factors) == 3, "vae_scale_factors needs (temporal, height, width)"),
            (self.attention_head_dim % 2 == 0, "attention_head_dim must be even (rotary pairs)"),
        ] + self.dtype_checks())

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides):
        """Map a diffusers `config.json`; settings whose forward the refiner does not run are refused."""
        unsupported = {
            "cross_attn_mod": False, "norm_elementwise_affine": False, "qk_norm": "rms_norm_across_heads",
            "activation_fn": "gelu-approximate", "use_prompt_embeddings": True, "perturbed_attn": False,
            "use_keyframes_abs_pos_embedding": False, "rope_double_precision": True,
        }
        for key, allowed in unsupported.items():
            if key in config and config[key] != allowed:
                raise ValueError(f"unsupported refiner config: {key}={config[key]!r} (expected {allowed!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype"}
        values = {name: config[name] for name in names if name in config and config[name] is not None}
        return cls(**{**values, **overrides})


@dataclasses.dataclass(frozen=True)
class ConnectorsConfig(FrozenConfig, DtypePolicy):
    """`LTX2TextConnectors` (the video connector only: the audio one feeds the unused audio stream).

    caption_channels * text_proj_in_factor: the flattened text-encoder state width (hidden size x layers + 1).
    """

    caption_channels: int = 3840
    text_proj_in_factor: int = 49
    video_connector_num_attention_heads: int = 30
    video_connector_attention_head_dim: int = 128
    video_connector_num_layers: int = 2
    video_connector_num_learnable_registers: int | None = 128
    video_gated_attn: bool = False
    connector_rope_base_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "interleaved"
    proj_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        self.check([
            (self.rope_type in ROPE_TYPES, f"rope_type must be one of {ROPE_TYPES}"),
            (self.inner_dim == self.caption_channels,
             "video connector width (heads x head_dim) must equal caption_channels"),
        ] + self.dtype_checks())

    @property
    def inner_dim(self) -> int:
        return self.video_connector_num_attention_heads * self.video_connector_attention_head_dim

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides):
        unsupported = {"per_modality_projections": False, "causal_temporal_positioning": False,
                       "rope_double_precision": True}
        for key, allowed in unsupported.items():
            if key in config and config[key] != allowed:
                raise ValueError(f"unsupported connectors config: {key}={config[key]!r} (expected {allowed!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype"}
        values = {name: config[name] for name in names if name in config}
        return cls(**{**values, **overrides})


REFINER_PRESETS = {
    "ltx2_refiner": RefinerConfig(),
    "ltx2_refiner_tiny": RefinerConfig(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        caption_channels=12, num_layers=2, pos_embed_max_pos=20, base_height=256, base_width=256,
    ),
}
CONNECTOR_PRESETS = {
    "ltx2_connectors": ConnectorsConfig(),
    "ltx2_connectors_tiny": ConnectorsConfig(
        caption_channels=12, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=6, video_connector_num_layers=2, video_connector_num_learnable_registers=4,
    ),
}
