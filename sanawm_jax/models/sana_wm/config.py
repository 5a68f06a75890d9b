"""Model configuration: one frozen dataclass, named presets, and the diffusers `config.json` mapping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sanawm_jax.dtypes import DtypePolicy
from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.models.sana_wm.chunks import chunk_starts
from sanawm_jax.ops.context_parallel import CONTEXT_IMPLS

GDN_IMPLS = ("xla", "pallas")
MODES = ("bidirectional", "chunk_causal", "streaming")
ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class SanaWMConfig(FrozenConfig, DtypePolicy):
    """Architecture of the SANA-WM DiT plus the numerics/runtime policy of our implementation.

    Architecture fields keep the names of diffusers' `SanaWMTransformer3DModel` config so released `config.json`
    files map one to one. Policy fields:
      param_dtype / dtype: storage dtype of parameters and compute dtype of matmuls/activations ("float32",
        "bfloat16"). Recurrences, norms and softmax statistics always run in float32.
      gdn_impl: implementation of the frame-level GDN recurrence ("xla": the `lax.scan` op in `sanawm_jax.ops.gdn`;
        "pallas": the fused kernel in `pallas_kernels.frame_gdn`, Triton on GPU, interpreted on CPU).
      attention_impl: softmax attention ("xla" einsum+softmax, or "cudnn" fused kernel on NVIDIA GPUs).
      remat: rematerialise each block in the backward pass (activation checkpointing).
      camera_branches: False switches both camera branches off (an ablation): the model ignores its camera inputs,
        so neither the UCPE camera branch of the self-attention nor the Plücker term runs; the parameter tree
        is unchanged.
      context_impl: how frame-mixing layers run when a mesh's "context" axis shards the frames (see
        `sanawm_jax.ops.context_parallel`): "allgather" (softmax over all-gathered K/V, GDN state passing), "ring"
        (softmax K/V passed around the ring, GDN state passing) or "ulysses" (all-to-all to head shards, where the
        context size divides the heads; "allgather" otherwise). Exact in every case.
    Mode fields (which released checkpoint the weights belong to; one parameter layout for all three):
      mode: "bidirectional" (every frame sees every frame), "chunk_causal" (the stage-1 teacher: block-causal over
        chunks of `chunk_frames` latent frames, the first chunk one frame longer) or "streaming" (the few-step
        student: the chunk-causal model run block by block with carried state).
      chunk_frames: latent frames per chunk (streaming: per generated block).
      num_cached_blocks: streaming softmax K/V window, in blocks, besides the sink (the first block).
    """

    in_channels: int = 128
    num_layers: int = 20
    hidden_size: int = 2240
    num_attention_heads: int = 20
    patch_size: tuple[int, int, int] = (1, 1, 1)
    softmax_every_n: int = 4
    linear_head_dim: int = 112
    t_kernel_size: int = 3
    conv_kernel_size: int = 4
    qk_norm: bool = True
    cross_norm: bool = True
    y_norm: bool = True
    chunk_plucker_channels: int = 48
    chunk_plucker_post_attn_blocks: int = 20
    caption_channels: int = 2304
    mlp_ratio: float = 3.0
    rope_max_seq_len: int = 1024

    param_dtype: str = "float32"
    dtype: str = "float32"
    gdn_impl: str = "xla"
    attention_impl: str = "xla"
    remat: bool = False
    camera_branches: bool = True
    context_impl: str = "allgather"

    mode: str = "bidirectional"
    chunk_frames: int = 3
    num_cached_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        checks = [
            (self.hidden_size % self.linear_head_dim == 0, "hidden_size must be a multiple of linear_head_dim"),
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of num_attention_heads"),
            (self.linear_head_dim % 8 == 0, "linear_head_dim must be a multiple of 8 (UCPE 4x4 groups on half of it)"),
            (self.patch_size[0] == 1, "temporal patch size must be 1"),
            (self.gdn_impl in GDN_IMPLS, f"gdn_impl must be one of {GDN_IMPLS}"),
            (self.attention_impl in ATTENTION_IMPLS, f"attention_impl must be one of {ATTENTION_IMPLS}"),
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.context_impl in CONTEXT_IMPLS, f"context_impl must be one of {CONTEXT_IMPLS}"),
            (self.chunk_frames >= 1, "chunk_frames must be >= 1"),
            (self.num_cached_blocks >= 1, "num_cached_blocks must be >= 1"),
        ]
        self.check(checks + self.dtype_checks())

    @property
    def self_attention_heads(self) -> int:
        return self.hidden_size // self.linear_head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def chunk_layout(self, num_frames: int) -> tuple[int, ...] | None:
        """Chunk start frames of a causal mode (`chunks.chunk_starts`); None for the bidirectional mode."""
        if self.mode == "bidirectional":
            return None
        return chunk_starts(num_frames, self.chunk_frames)

    def is_softmax_block(self, index: int) -> bool:
        return self.softmax_every_n > 0 and (index + 1) % self.softmax_every_n == 0

    def has_plucker_proj(self, index: int) -> bool:
        return self.chunk_plucker_post_attn_blocks < 0 or index < self.chunk_plucker_post_attn_blocks

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "SanaWMConfig":
        """Maps a diffusers `SanaWMTransformer3DModel` config.json dict; rejects settings we do not implement.
        The FFN and RoPE names of the causal variants (NVlabs' spelling, as in converted third-party folders) and a
        `chunk_size` set `mode` (see `mode_of`) and `chunk_frames`."""
        accepted_values = {
            "ffn_type": ("GLUMBConvTemp", "ChunkGLUMBConvTemp", "CachedGLUMBConvTemp"),  # one FFN, three modes
            "pos_embed_type": ("wan_rope", "casual_wan_rope"),  # sic: the streaming model's RoPE
            "k_conv_only": (True,),
            "cam_attn_compress": (1,),
            "use_chunk_plucker_post_attn": (True,),
            "use_pe": (True,),
            "pred_sigma": (False,),
        }
        for key, accepted in accepted_values.items():
            if key in config and _normalise(config[key]) not in accepted:
                allowed = " or ".join(map(repr, accepted))
                raise ValueError(f"unsupported diffusers config: {key}={config[key]!r} (only {allowed})")
        if "mlp_acts" in config and list(config["mlp_acts"]) != ["silu", "silu", None]:
            raise ValueError(f"unsupported diffusers config: mlp_acts={config['mlp_acts']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        fields.update(mode_fields(config))
        return cls(**fields)


def mode_of(fields: dict[str, Any]) -> str | None:
    """The mode a released config states, or None when it states none. `fields` is a diffusers config.json or the
    `model:` section of an NVlabs config.yaml: "streaming" for the streaming model class, its cached FFN or its causal
    RoPE (spelled "casual_wan_rope" upstream); "chunk_causal" for chunk-causal attention or FFN, or a chunk size;
    "bidirectional" for bidirectional attention or the plain FFN."""
    text = " ".join(str(fields.get(name) or "") for name in ("model", "attn_type", "camctrl_type", "ffn_type"))
    if "Streaming" in text or "Cached" in text or fields.get("pos_embed_type") == "casual_wan_rope":
        return "streaming"
    if "ChunkCausal" in text or "ChunkGLUMB" in text or fields.get("chunk_size") is not None:
        return "chunk_causal"
    if "Bidirectional" in text or fields.get("ffn_type") == "GLUMBConvTemp":
        return "bidirectional"
    return None


def mode_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The SanaWMConfig fields a released config fixes (see `mode_of`): `mode`, and `chunk_frames` from its chunk
    size."""
    mode, chunk = mode_of(fields), fields.get("chunk_size")
    return {**({"mode": mode} if mode else {}), **({"chunk_frames": chunk} if isinstance(chunk, int) else {})}


def _normalise(value):
    return tuple(value) if isinstance(value, list) else value


PRESETS: dict[str, SanaWMConfig] = {
    # The released bidirectional model (Efficient-Large-Model/SANA-WM_bidirectional), 2,661,800,448 parameters.
    "sana_wm_2.6b": SanaWMConfig(),
    # A few blocks of each kind, for tests and quick experiments.
    "sana_wm_tiny": SanaWMConfig(
        in_channels=8,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        linear_head_dim=16,
        caption_channels=32,
        chunk_plucker_post_attn_blocks=4,
    ),
}


def get_config(name_or_path: str, **overrides) -> SanaWMConfig:
    """A preset name, a `SanaWMConfig` JSON written by us, or a diffusers transformer `config.json`."""
    if name_or_path in PRESETS:
        config = PRESETS[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"unknown config {name_or_path!r}: not a preset ({sorted(PRESETS)}) nor a JSON file")
        values = json.loads(path.read_text())
        is_diffusers = "_class_name" in values or "num_layers" in values and "gdn_impl" not in values
        config = SanaWMConfig.from_diffusers_config(values) if is_diffusers else SanaWMConfig.from_dict(values)
    return config.replace(**overrides)
