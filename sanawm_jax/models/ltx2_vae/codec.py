"""Pixels <-> normalised latents with the LTX-2 video VAE, as the SANA-WM pipeline uses it.

encode: video (B, F, H, W, 3) in [-1, 1], F = 1 + 8k -> latents (B, 1 + k, H/32, W/32, 128),
        z = (posterior mode - latents_mean) * scaling_factor / latents_std.
decode: the inverse normalisation, then the decoder; (B, T, h, w, 128) -> (B, 1 + 8(T-1), 32h, 32w, 3), nominally in
        [-1, 1] and not clamped (`video_to_uint8` clamps).
Both are jitted per input shape with the config static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.ltx2_vae.config import VAEConfig
from sanawm_jax.models.ltx2_vae.model import VideoAutoencoder


def check_video(shape: tuple[int, ...], config: VAEConfig) -> None:
    """Raise ValueError naming what is wrong with a (B, F, H, W, C) pixel video shape."""
    if len(shape) != 5:
        raise ValueError(f"video must be (B, F, H, W, {config.in_channels}), got shape {shape}")
    _, frames, height, width, channels = shape
    ratio_t, ratio_s = config.temporal_compression_ratio, config.spatial_compression_ratio
    if channels != config.in_channels:
        raise ValueError(f"video must have {config.in_channels} channels (last axis), got {channels}")
    if frames < 1 or (frames - 1) % ratio_t:
        raise ValueError(f"video frame count must be {ratio_t}k+1 (1, {ratio_t + 1}, ...), got {frames}")
    if height % ratio_s or width % ratio_s or height == 0 or width == 0:
        raise ValueError(f"video height and width must be positive multiples of {ratio_s}, got {height}x{width}")


def check_latents(shape: tuple[int, ...], config: VAEConfig) -> None:
    """Raise ValueError naming what is wrong with a (B, T, h, w, C) latent shape."""
    if len(shape) != 5:
        raise ValueError(f"latents must be (B, T, h, w, {config.latent_channels}), got shape {shape}")
    _, frames, height, width, channels = shape
    if channels != config.latent_channels:
        raise ValueError(f"latents must have {config.latent_channels} channels (last axis), got {channels}")
    if frames < 1:
        raise ValueError(f"latents need at least one frame, got {frames}")
    min_side = 2 if config.decoder_spatial_padding_mode == "reflect" else 1
    if height < min_side or width < min_side:
        raise ValueError(
            f"latent height and width must be >= {min_side} ({config.decoder_spatial_padding_mode} padding), "
            f"got {height}x{width}"
        )


@functools.partial(jax.jit, static_argnames="config")
def _encode(params, video, config: VAEConfig):
    return VideoAutoencoder(config).apply({"params": params}, video, method="encode")


@functools.partial(jax.jit, static_argnames="config")
def _decode(params, latents, config: VAEConfig):
    return VideoAutoencoder(config).apply({"params": params}, latents, method="decode")


def encode(params, video, config: VAEConfig) -> jax.Array:
    """Video (B, F, H, W, 3) in [-1, 1] -> normalised posterior-mode latents (B, T, H/32, W/32, C), float32."""
    check_video(np.shape(video), config)
    return _encode(params, jnp.asarray(video), config)


def decode(params, latents, config: VAEConfig) -> jax.Array:
    """Normalised latents (B, T, h, w, C) -> video (B, 1 + 8(T-1), 32h, 32w, 3), float32, unclamped."""
    check_latents(np.shape(latents), config)
    return _decode(params, jnp.asarray(latents), config)


def video_to_uint8(video) -> np.ndarray:
    """[-1, 1] floats -> uint8 as the diffusers video post-processing does: round(255 * clip((x + 1) / 2, 0, 1))."""
    video = np.asarray(video, np.float32)
    return np.round(np.clip((video + 1.0) * 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)
