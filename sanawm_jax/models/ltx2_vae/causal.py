"""Chunk-by-chunk decoding with a causal LTX-2 decoder (the streaming release's `ltx2_causal_vae/`).

A causal decoder pads time only in front, so the pixels of latent frame t depend on latent frames <= t. Decoding a
clip in consecutive chunks, each temporal convolution carrying the last two frames it saw into the next chunk, gives
the whole-clip decode: the first chunk of T latent frames yields 1 + 8(T-1) pixel frames, every later chunk 8T.

    decoder = CausalDecoder(config)                     # config.decoder_causal must be True
    cache = decoder.init_cache(batch, latent_height, latent_width)
    for block in latent_blocks:                         # (B, T_k, h, w, C) normalised latents
        frames, cache = decoder.decode_chunk(params, block, cache)   # (B, F_k, 32h, 32w, 3) float32, unclamped

The cache is a pytree of fixed shapes (two frames per temporal convolution), so one compiled step serves every later
chunk of a given length (the first chunk compiles apart: it pads instead of reading the cache).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.ltx2_vae.codec import check_latents
from sanawm_jax.models.ltx2_vae.config import VAEConfig
from sanawm_jax.models.ltx2_vae.model import CACHE, VideoAutoencoder


@flax.struct.dataclass
class DecoderCache:
    """What a chunked decode carries between chunks.

    frames: the "cache" variable collection of `VideoAutoencoder`: for each temporal convolution of the decoder, the
      last two frames it saw, (B, 2, h_l, w_l, C_l) in the compute dtype.
    started: False before the first chunk (static: the first chunk pads instead of reading `frames`).
    """

    frames: dict
    started: bool = flax.struct.field(pytree_node=False, default=False)


@functools.partial(jax.jit, static_argnames="config")
def decode_step(params, latents, cache: DecoderCache, config: VAEConfig) -> tuple[jax.Array, DecoderCache]:
    """The jitted program of one chunk (no input checks; see `CausalDecoder.decode_chunk`)."""
    model = VideoAutoencoder(config, chunk="next" if cache.started else "first")
    frames, variables = model.apply({"params": params, CACHE: cache.frames}, latents, method="decode", mutable=[CACHE])
    return frames, DecoderCache(variables[CACHE], started=True)


class CausalDecoder:
    """Decodes normalised latents chunk by chunk with a causal LTX-2 decoder; see the module docstring."""

    def __init__(self, config: VAEConfig):
        if not config.decoder_causal:
            raise ValueError("chunked decoding needs a causal decoder (decoder_causal=True, the streaming release's "
                             "ltx2_causal_vae); this VAE's decoder pads time on both sides")
        self.config = config

    def init_cache(self, batch: int, latent_height: int, latent_width: int) -> DecoderCache:
        """An empty cache for clips of `batch` x (latent_height, latent_width) latents."""
        latents = jax.ShapeDtypeStruct((batch, 1, latent_height, latent_width, self.config.latent_channels),
                                       jnp.float32)
        check_latents(latents.shape, self.config)
        model = VideoAutoencoder(self.config, chunk="first")
        shapes = jax.eval_shape(
            lambda z: model.init_with_output(jax.random.key(0), z, method="decode")[1][CACHE], latents
        )
        return DecoderCache(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def decode_chunk(self, params, latents, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Normalised latents (B, T, h, w, C) of the next chunk -> (pixels (B, F, 32h, 32w, 3) float32, new cache),
        with F = 1 + 8(T-1) for the first chunk and 8T after it."""
        shape = np.shape(latents)
        check_latents(shape, self.config)
        cached = jax.tree.leaves(cache.frames["decoder"]["conv_in"])[0].shape
        if (shape[0], *shape[2:4]) != (cached[0], *cached[2:4]):
            raise ValueError(f"latent chunk of batch {shape[0]} and grid {shape[2]}x{shape[3]} does not continue a "
                             f"clip of batch {cached[0]} and grid {cached[2]}x{cached[3]}")
        return decode_step(params, jnp.asarray(latents), cache, self.config)
