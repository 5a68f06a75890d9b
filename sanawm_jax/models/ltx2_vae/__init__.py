"""The LTX-2 video VAE (stride t8/h32/w32, 128 latent channels) in Flax, channels-last."""

from sanawm_jax.models.ltx2_vae.causal import CausalDecoder, DecoderCache
from sanawm_jax.models.ltx2_vae.checkpoint import convert_vae
from sanawm_jax.models.ltx2_vae.codec import decode, encode, video_to_uint8
from sanawm_jax.models.ltx2_vae.config import VAE_PRESETS, VAEConfig
from sanawm_jax.models.ltx2_vae.model import (
    VideoAutoencoder,
    abstract_vae_params,
    init_vae_params,
)
from sanawm_jax.models.ltx2_vae.tiling import decode_tiled

__all__ = [
    "CausalDecoder",
    "DecoderCache",
    "VAE_PRESETS",
    "VAEConfig",
    "VideoAutoencoder",
    "abstract_vae_params",
    "convert_vae",
    "decode",
    "decode_tiled",
    "encode",
    "init_vae_params",
    "video_to_uint8",
]
