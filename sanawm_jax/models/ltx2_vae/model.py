"""The LTX-2 video VAE as Flax linen modules, channels-last: video (B, F, H, W, 3) <-> latents (B, T, h, w, C).

Frames: the encoder maps F = 1 + 8k pixel frames to T = 1 + k latent frames (the first frame on its own); the decoder
inverts that. Every convolution is 3x3x3; time is padded by repeating edge frames (causal: the first frame twice in
front; non-causal: one copy at each end), space by the configured padding mode. Norms are parameter-free per-position
RMS norms over channels. Module and parameter names follow diffusers' `AutoencoderKLLTX2Video`, with `name.N`
spelled `name_N`, so a diffusers state dict converts by a fixed rule (see `sanawm_jax.models.ltx2_vae.checkpoint`).

A causal decoder also decodes chunk by chunk (`VideoDecoder.chunk`): each temporal convolution keeps the last two frames
it saw in the "cache" collection and puts them in front of the next chunk, so the chunks together equal the whole-clip
decode (see `sanawm_jax.models.ltx2_vae.causal`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.models.ltx2_vae.config import PADDING_MODES, SCALING_STRIDES, VAEConfig
from sanawm_jax.ops.norm import rms_normalize

Dtype = Any
CACHE = "cache"  # variable collection of a chunked decode: per temporal conv, "frames" (B, 2, h, w, C) it saw last
CHUNKS = (None, "first", "next")  # whole clip; first chunk of a chunked decode; any later chunk


def rms_norm(x, eps: float = 1e-8):
    """Parameter-free RMS norm over channels (last axis), statistics in float32, output in x.dtype."""
    return rms_normalize(x, eps).astype(x.dtype)


def space_to_depth(x, stride: tuple[int, int, int]):
    """(B, T, H, W, C) -> (B, T/st, H/sh, W/sw, C*st*sh*sw), channel order (c, t, h, w)."""
    b, t, h, w, c = x.shape
    st, sh, sw = stride
    x = x.reshape(b, t // st, st, h // sh, sh, w // sw, sw, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t // st, h // sh, w // sw, c * st * sh * sw)


def depth_to_space(x, stride: tuple[int, int, int]):
    """Inverse of `space_to_depth`: (B, T, H, W, C*st*sh*sw) -> (B, T*st, H*sh, W*sw, C)."""
    b, t, h, w, c = x.shape
    st, sh, sw = stride
    x = x.reshape(b, t, h, w, c // (st * sh * sw), st, sh, sw)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, t * st, h * sh, w * sw, c // (st * sh * sw))


def patchify(video, patch_size: int):
    """(B, F, H, W, C) -> (B, F, H/p, W/p, C*p*p), channel order (c, pw, ph) as upstream."""
    b, f, h, w, c = video.shape
    p = patch_size
    x = video.reshape(b, f, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x, patch_size: int):
    """Inverse of `patchify`: (B, F, h, w, C*p*p) -> (B, F, h*p, w*p, C)."""
    b, f, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, f, h, w, c // (p * p), p, p)
    x = x.transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, f, h * p, w * p, c // (p * p))


@dataclasses.dataclass(frozen=True)
class ConvSettings:
    """What every layer of one half (encoder or decoder) shares: temporal causality, spatial padding mode, the
    LayerNorm eps of channel-changing shortcuts, compute and parameter dtypes, and which part of a chunked decode runs
    (`chunk`, one of `CHUNKS`; only with causal padding)."""

    causal: bool
    padding_mode: str
    eps: float
    dtype: Dtype
    param_dtype: Dtype
    chunk: str | None = None

    def __post_init__(self):
        if self.chunk not in CHUNKS or (self.chunk is not None and not self.causal):
            raise ValueError(f"chunked decoding needs causal padding and chunk in {CHUNKS}, got {self.chunk!r}")

    @classmethod
    def for_encoder(cls, config: VAEConfig) -> "ConvSettings":
        return cls(config.encoder_causal, config.encoder_spatial_padding_mode, config.resnet_norm_eps,
                   config.compute_dtype, config.parameter_dtype)

    @classmethod
    def for_decoder(cls, config: VAEConfig, chunk: str | None = None) -> "ConvSettings":
        return cls(config.decoder_causal, config.decoder_spatial_padding_mode, config.resnet_norm_eps,
                   config.compute_dtype, config.parameter_dtype, chunk)


class CausalConv3d(nn.Module):
    """3x3x3 convolution with edge-frame temporal padding (causal or centred) and the configured spatial padding.

    In a chunked decode the two frames in front of a chunk are the last two (padded) input frames of the previous
    chunk, read from and written to the "cache" collection; the first chunk is padded as a whole clip is."""

    features: int
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        s = self.settings
        if s.chunk == "next":
            x = jnp.concatenate([self.get_variable(CACHE, "frames").astype(x.dtype), x], axis=1)
        else:
            time_pad = (2, 0) if s.causal else (1, 1)
            x = jnp.pad(x, ((0, 0), time_pad, (0, 0), (0, 0), (0, 0)), mode="edge")
        if s.chunk is not None:
            self.put_variable(CACHE, "frames", x[:, -2:])
        x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode=PADDING_MODES[s.padding_mode])
        return nn.Conv(self.features, (3, 3, 3), padding="VALID", dtype=s.dtype, param_dtype=s.param_dtype,
                       name="conv")(x)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm(conv1(silu(norm(x)))))); a channel change adds LayerNorm + 1x1x1 conv on the shortcut."""

    features: int
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        s = self.settings
        h = CausalConv3d(self.features, s, name="conv1")(nn.silu(rms_norm(x)))
        h = CausalConv3d(self.features, s, name="conv2")(nn.silu(rms_norm(h)))
        if x.shape[-1] != self.features:
            norm = nn.LayerNorm(s.eps, dtype=jnp.float32, param_dtype=s.param_dtype, name="norm3")
            x = norm(x.astype(jnp.float32)).astype(s.dtype)
            x = nn.Conv(self.features, (1, 1, 1), dtype=s.dtype, param_dtype=s.param_dtype, name="conv_shortcut")(x)
        return h + x


def resnet_layers(x, num_layers: int, settings: ConvSettings, features: int | None = None):
    """`num_layers` resnets named `resnets_i`, created in the calling module; width `features` (default: x's)."""
    for i in range(num_layers):
        x = ResnetBlock(features or x.shape[-1], settings, name=f"resnets_{i}")(x)
    return x


class Downsampler(nn.Module):
    """Stride-(st, sh, sw) downsampling to `features` channels: space-to-depth of a conv plus a space-to-depth
    residual averaged over channel groups. `st - 1` leading copies of the first frame keep F = 1 + st*k exact."""

    features: int
    stride: tuple[int, int, int]
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        x = jnp.concatenate([x[:, : self.stride[0] - 1], x], axis=1)
        residual = space_to_depth(x, self.stride)
        residual = residual.reshape(*residual.shape[:-1], self.features, -1).mean(axis=-1)
        conv = CausalConv3d(self.features // math.prod(self.stride), self.settings, name="conv")
        return space_to_depth(conv(x), self.stride) + residual


class Upsampler(nn.Module):
    """Stride-(st, sh, sw) upsampling to C/upscale_factor channels: depth-to-space of a conv, optionally plus a
    depth-to-space residual tiled over channels; the first `st - 1` frames are dropped (T -> st*T - st + 1), except in
    the later chunks of a chunked decode (T -> st*T), which continue the clip."""

    stride: tuple[int, int, int]
    residual: bool
    upscale_factor: int
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        factor = math.prod(self.stride)
        drop = 0 if self.settings.chunk == "next" else self.stride[0] - 1
        conv = CausalConv3d(x.shape[-1] * factor // self.upscale_factor, self.settings, name="conv")
        h = depth_to_space(conv(x), self.stride)[:, drop:]
        if self.residual:
            shortcut = depth_to_space(x, self.stride)
            h = h + jnp.tile(shortcut, (1, 1, 1, 1, factor // self.upscale_factor))[:, drop:]
        return h


class MidBlock(nn.Module):
    """Channel-preserving resnets."""

    num_layers: int
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        return resnet_layers(x, self.num_layers, self.settings)


class DownBlock(nn.Module):
    """Resnets at the input width, then (if `downsample`) a `downsample_type` downsampler to `features` channels."""

    features: int
    num_layers: int
    downsample: bool
    downsample_type: str
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        x = resnet_layers(x, self.num_layers, self.settings)
        if self.downsample:
            stride = SCALING_STRIDES[self.downsample_type]
            x = Downsampler(self.features, stride, self.settings, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    """A channel-changing resnet `conv_in` (when in_channels != features), an optional upsampler, resnets."""

    in_channels: int
    features: int
    num_layers: int
    upsample: bool
    upsample_type: str
    upsample_residual: bool
    upscale_factor: int
    settings: ConvSettings

    @nn.compact
    def __call__(self, x):
        if self.in_channels != self.features:
            x = ResnetBlock(self.features, self.settings, name="conv_in")(x)
        if self.upsample:
            stride = SCALING_STRIDES[self.upsample_type]
            x = Upsampler(stride, self.upsample_residual, self.upscale_factor, self.settings, name="upsamplers_0")(x)
        return resnet_layers(x, self.num_layers, self.settings, self.features)


class VideoEncoder(nn.Module):
    """Pixels (B, F, H, W, in_channels) -> posterior mode (B, T, H/32, W/32, latent_channels), not normalised; with
    `with_log_variance` also the posterior's log-variance (B, T, H/32, W/32), shared by every latent channel."""

    config: VAEConfig

    @nn.compact
    def __call__(self, video, with_log_variance: bool = False):
        cfg = self.config
        settings = ConvSettings.for_encoder(cfg)
        x = patchify(video.astype(cfg.compute_dtype), cfg.patch_size)
        x = CausalConv3d(cfg.latent_channels, settings, name="conv_in")(x)
        for i, features in enumerate(cfg.block_out_channels):
            x = DownBlock(features, cfg.layers_per_block[i], cfg.spatio_temporal_scaling[i], cfg.downsample_type[i],
                          settings, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.layers_per_block[-1], settings, name="mid_block")(x)
        # conv_out predicts latent_channels means and one shared log-variance; the mode is the means.
        x = CausalConv3d(cfg.latent_channels + 1, settings, name="conv_out")(nn.silu(rms_norm(x)))
        if with_log_variance:
            return x[..., : cfg.latent_channels], x[..., cfg.latent_channels]
        return x[..., : cfg.latent_channels]


class VideoDecoder(nn.Module):
    """Latents (B, T, h, w, latent_channels), not normalised -> pixels (B, 1 + 8(T-1), 32h, 32w, out_channels).

    chunk: None decodes a whole clip. "first" / "next" decode the first / a later chunk of a clip with a causal
    decoder (apply with the "cache" collection mutable; a later chunk yields 8T pixel frames)."""

    config: VAEConfig
    chunk: str | None = None

    @nn.compact
    def __call__(self, latents):
        cfg = self.config
        settings = ConvSettings.for_decoder(cfg, self.chunk)
        widths = cfg.decoder_block_out_channels[::-1]
        layers = cfg.decoder_layers_per_block[::-1]
        upsample = cfg.decoder_spatio_temporal_scaling[::-1]
        residual = cfg.upsample_residual[::-1]
        factors = cfg.upsample_factor[::-1]
        channels = widths[0]
        x = CausalConv3d(channels, settings, name="conv_in")(latents.astype(cfg.compute_dtype))
        x = MidBlock(layers[0], settings, name="mid_block")(x)
        for i, width in enumerate(widths):
            in_channels, channels = channels // factors[i], width // factors[i]
            x = UpBlock(in_channels, channels, layers[i + 1], upsample[i], cfg.upsample_type[i], residual[i],
                        factors[i], settings, name=f"up_blocks_{i}")(x)
        x = CausalConv3d(cfg.out_channels * cfg.patch_size**2, settings, name="conv_out")(nn.silu(rms_norm(x)))
        return unpatchify(x, cfg.patch_size)


class VideoAutoencoder(nn.Module):
    """Encoder, decoder and the per-channel latent statistics `latents_mean` / `latents_std` (float32).

    `encode` returns normalised latents (mode - mean) * scaling_factor / std; `decode` inverts the normalisation
    before decoding. Both return float32. `chunk` selects a chunked decode (see `VideoDecoder`).
    """

    config: VAEConfig
    chunk: str | None = None

    def setup(self):
        channels = self.config.latent_channels
        self.encoder = VideoEncoder(self.config)
        self.decoder = VideoDecoder(self.config, self.chunk)
        self.latents_mean = self.param("latents_mean", nn.initializers.zeros, (channels,), jnp.float32)
        self.latents_std = self.param("latents_std", nn.initializers.ones, (channels,), jnp.float32)

    def encode(self, video):
        mode = self.encoder(video).astype(jnp.float32)
        return (mode - self.latents_mean) * self.config.scaling_factor / self.latents_std

    def posterior(self, video):
        """The diagonal Gaussian posterior, not normalised: means (B, T, h, w, C) and the shared log-variance
        (B, T, h, w), both float32 (training only; `encode` returns the normalised means)."""
        mean, log_variance = self.encoder(video, with_log_variance=True)
        return mean.astype(jnp.float32), log_variance.astype(jnp.float32)

    def decode_raw(self, latents):
        """Un-normalised latents (B, T, h, w, C) -> pixels, float32 (what `decode` runs after de-normalising)."""
        return self.decoder(latents).astype(jnp.float32)

    def decode(self, latents):
        latents = latents.astype(jnp.float32) / self.config.scaling_factor * self.latents_std + self.latents_mean
        return self.decode_raw(latents)

    def __call__(self, video):
        return self.decode(self.encode(video))


def example_video(config: VAEConfig) -> jax.ShapeDtypeStruct:
    """The smallest valid input (one frame, a 2x2 latent grid, as reflect padding needs >= 2 positions)."""
    side = 2 * config.spatial_compression_ratio
    return jax.ShapeDtypeStruct((1, 1, side, side, config.in_channels), jnp.float32)


def init_vae_params(config: VAEConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (encoder, decoder, latents_mean zeros, latents_std ones)."""
    video = jnp.zeros(example_video(config).shape, jnp.float32)
    return VideoAutoencoder(config).init(rng, video)["params"]


def abstract_vae_params(config: VAEConfig) -> dict:
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct tree) without allocating anything."""
    return jax.eval_shape(lambda rng: init_vae_params(config, rng), jax.random.key(0))
