"""Configuration of the LTX-2 video VAE: one frozen dataclass, presets, and the diffusers `config.json` mapping."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sanawm_jax.dtypes import DtypePolicy
from sanawm_jax.frozen_config import FrozenConfig

# (t, h, w) stride of each encoder downsampling type and decoder upsampling type.
SCALING_STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
DOWN_BLOCK_TYPE = "LTX2VideoDownBlock3D"


@dataclasses.dataclass(frozen=True)
class VAEConfig(FrozenConfig, DtypePolicy):
    """Architecture of the LTX-2 video VAE plus the numerics policy of our implementation.

    Architecture fields keep the names of diffusers' `AutoencoderKLLTX2Video` config; the defaults are the released
    SANA-WM `vae/config.json` (stride t8/h32/w32, 128 latent channels, causal encoder, non-causal reflect-padded
    decoder, no timestep conditioning). Policy fields:
      param_dtype / dtype: storage dtype of parameters and compute dtype of convolutions ("float32", "bfloat16").
        Norm statistics and the latent normalisation always run in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    block_out_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    decoder_block_out_channels: tuple[int, ...] = (256, 512, 1024)
    layers_per_block: tuple[int, ...] = (4, 6, 6, 2, 2)
    decoder_layers_per_block: tuple[int, ...] = (5, 5, 5, 5)
    spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, True)
    decoder_spatio_temporal_scaling: tuple[bool, ...] = (True, True, True)
    downsample_type: tuple[str, ...] = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")
    upsample_type: tuple[str, ...] = ("spatiotemporal", "spatiotemporal", "spatiotemporal")
    upsample_residual: tuple[bool, ...] = (True, True, True)
    upsample_factor: tuple[int, ...] = (2, 2, 2)
    patch_size: int = 4
    resnet_norm_eps: float = 1e-6
    scaling_factor: float = 1.0
    encoder_causal: bool = True
    decoder_causal: bool = False
    encoder_spatial_padding_mode: str = "zeros"
    decoder_spatial_padding_mode: str = "reflect"

    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        num_down, num_up = len(self.block_out_channels), len(self.decoder_block_out_channels)
        lengths = {
            "layers_per_block": num_down + 1,  # + the mid block
            "spatio_temporal_scaling": num_down,
            "downsample_type": num_down,
            "decoder_layers_per_block": num_up + 1,
            "decoder_spatio_temporal_scaling": num_up,
            "upsample_type": num_up,
            "upsample_residual": num_up,
            "upsample_factor": num_up,
        }
        checks = [(len(getattr(self, name)) == n, f"{name} needs {n} entries") for name, n in lengths.items()]
        checks += [
            (set(self.downsample_type + self.upsample_type) <= set(SCALING_STRIDES),
             f"down/upsample types must be in {sorted(SCALING_STRIDES)}"),
            ({self.encoder_spatial_padding_mode, self.decoder_spatial_padding_mode} <= set(PADDING_MODES),
             f"padding modes must be in {sorted(PADDING_MODES)}"),
        ]
        self.check(checks + self.dtype_checks())
        if self.encoder_compression != self.decoder_compression:
            raise ValueError(
                f"VAEConfig: encoder compresses (t, h, w) by {self.encoder_compression} but the decoder expands by "
                f"{self.decoder_compression}"
            )

    @property
    def encoder_compression(self) -> tuple[int, int, int]:
        """(t, h, w) compression of the encoder: patchify times every enabled downsampler."""
        return _compose(self.downsample_type, self.spatio_temporal_scaling, self.patch_size)

    @property
    def decoder_compression(self) -> tuple[int, int, int]:
        """(t, h, w) expansion of the decoder: every enabled upsampler times unpatchify."""
        return _compose(self.upsample_type, self.decoder_spatio_temporal_scaling, self.patch_size)

    @property
    def temporal_compression_ratio(self) -> int:
        return self.encoder_compression[0]

    @property
    def spatial_compression_ratio(self) -> int:
        return self.encoder_compression[1]

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Latent frames 1 + k -> pixel frames 1 + k * t_ratio (the first frame is encoded on its own)."""
        return 1 + (num_latent_frames - 1) * self.temporal_compression_ratio


    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "VAEConfig":
        """Map a diffusers `AutoencoderKLLTX2Video` config.json dict; reject settings we do not implement."""
        config = dict(config)
        config.setdefault("decoder_causal", True)  # diffusers' default differs from the released value
        unsupported = []
        if config.pop("timestep_conditioning", False):
            unsupported.append("timestep_conditioning=True (SANA-WM decodes with temb=None)")
        if any(_as_tuple(config.pop("decoder_inject_noise", False), 1)):
            unsupported.append("decoder_inject_noise=True (random noise injection in the decoder)")
        if config.pop("patch_size_t", 1) != 1:
            unsupported.append("patch_size_t != 1")
        down_types = set(config.pop("down_block_types", [DOWN_BLOCK_TYPE]))
        if down_types != {DOWN_BLOCK_TYPE}:
            unsupported.append(f"down_block_types={sorted(down_types)} (only {DOWN_BLOCK_TYPE})")
        if "conv" in config.get("downsample_type", ()):
            unsupported.append("downsample_type 'conv' (strided causal conv)")
        if unsupported:
            raise ValueError(f"unsupported diffusers VAE config: {'; '.join(unsupported)}")
        stated_ratios = (config.pop("temporal_compression_ratio", None), config.pop("spatial_compression_ratio", None))
        num_down = len(config.get("block_out_channels", cls.block_out_channels))
        num_up = len(config.get("decoder_block_out_channels", cls.decoder_block_out_channels))
        # diffusers lets these be a single bool for every block.
        for key, count in (
            ("spatio_temporal_scaling", num_down),
            ("decoder_spatio_temporal_scaling", num_up),
            ("upsample_residual", num_up),
        ):
            if key in config:
                config[key] = _as_tuple(config[key], count)
        names = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype"}
        result = cls(**{key: value for key, value in config.items() if key in names})
        actual = (result.temporal_compression_ratio, result.spatial_compression_ratio)
        for stated, got, axis in zip(stated_ratios, actual, ("temporal", "spatial")):
            if stated is not None and stated != got:
                raise ValueError(
                    f"diffusers VAE config states {axis}_compression_ratio={stated} but its blocks compress by {got}"
                )
        return result


def _compose(kinds: tuple[str, ...], enabled: tuple[bool, ...], patch_size: int) -> tuple[int, int, int]:
    strides = [SCALING_STRIDES[kind] for kind, on in zip(kinds, enabled) if on]
    return (
        math.prod(s[0] for s in strides),
        patch_size * math.prod(s[1] for s in strides),
        patch_size * math.prod(s[2] for s in strides),
    )


def _as_tuple(value, count: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * count


VAE_PRESETS: dict[str, VAEConfig] = {
    # The released SANA-WM / LTX-2 video VAE (Efficient-Large-Model/SANA-WM_bidirectional, vae/).
    "ltx2_video": VAEConfig(),
    # Narrow, at most one resnet per block; exercises every block kind, including the decoder's channel-changing
    # `conv_in` resnets (upsample_factor 1) and a non-residual upsampler.
    "ltx2_video_tiny": VAEConfig(
        latent_channels=8,
        block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(16, 32, 32),
        layers_per_block=(1, 0, 0, 0, 1),
        decoder_layers_per_block=(1, 0, 0, 1),
        upsample_factor=(1, 1, 2),
        upsample_residual=(True, False, True),
    ),
}
