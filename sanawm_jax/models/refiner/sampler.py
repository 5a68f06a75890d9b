"""Stage-2 refinement of stage-1 latents, as diffusers' `SanaWMLTX2Refiner.__call__` (pipelines/sana_wm/refiner.py)
runs it; the values and where they come from are listed in docs/refiner.md.

The first `sink_size` latent frames are the attention sink: their K/V is captured once before RoPE at sigma 0 and
they are returned unchanged. The other frames are refined in blocks of `block_size` latent frames, left to right.
Each block starts from its stage-1 latents re-noised at the first sigma, x = (1 - s0) z + s0 eps (one eps per block),
and takes one Euler step per sigma of `sigmas` (no CFG, every token at the same timestep sigma * 1000). Its queries
attend to [sink, history, block]: the sink re-rotated to sit just before the history, and the history being the
post-RoPE K/V of the last `kv_max_frames - sink_size` refined frames, captured by one more sigma-0 forward of each
refined block under the same prefix.

    latents = refine_latents(RefinerTransformer(config), params, latents, text, text_mask, noise, fps=16.0)

Latents are channels-last (B, F, H, W, C) float32; `noise` has the same shape (frames < sink_size are not read).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sanawm_jax.models.refiner.rope import rope_tables, video_fractions
from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer

# The 3-step distilled schedule (diffusers STAGE_2_DISTILLED_SIGMA_VALUES), ending at 0.
DISTILLED_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)
SINK_SIZE = 1
BLOCK_SIZE = 3
KV_MAX_FRAMES = 11


def block_bounds(num_frames: int, sink_size: int, block_size: int) -> list[tuple[int, int]]:
    """[start, end) latent-frame ranges of the refined blocks after the sink (the last one may be shorter)."""
    return [(start, min(start + block_size, num_frames)) for start in range(sink_size, num_frames, block_size)]


def frame_rope(config, frames, height: int, width: int, fps: float):
    """(cos, sin) tables of the tokens of latent frames `frames` on a (height, width) grid."""
    fractions = video_fractions(frames, height, width, scale_factors=config.vae_scale_factors,
                                causal_offset=config.causal_offset, fps=fps,
                                max_positions=(config.pos_embed_max_pos, config.base_height, config.base_width))
    return rope_tables(fractions, config.inner_dim, config.rope_theta, config.rope_type, config.num_attention_heads)


def refine_latents(model: RefinerTransformer, params, latents, text, text_mask, noise, *, fps: float,
           sigmas=DISTILLED_SIGMAS, sink_size: int = SINK_SIZE, block_size: int = BLOCK_SIZE,
           kv_max_frames: int = KV_MAX_FRAMES, on_block=None, progress: bool = False):
    """Refine stage-1 latents (B, F, H, W, C) -> refined latents of the same shape (frames < sink_size unchanged).

    text (B, L, D) / text_mask (B, L): the connectors' output for the prompt. sigmas: descending, ending at 0.
    kv_max_frames <= sink_size keeps the whole history. on_block(start, end, block) is called after each block
    (streaming callers write frames as they come). `progress` shows a bar over the blocks on stderr.
    """
    config = model.config
    batch, num_frames, height, width, channels = latents.shape
    if num_frames <= sink_size:
        raise ValueError(f"stage-1 latents have {num_frames} frames but sink_size={sink_size}")
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {noise.shape} differs from the latents' {latents.shape}")
    if len(sigmas) < 2 or sigmas[-1] != 0.0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be descending and end at 0.0, got {sigmas}")
    sigmas = np.asarray(sigmas, np.float32)
    tokens_per_frame = height * width
    max_history = kv_max_frames - sink_size
    tokens = lambda x: x.reshape(batch, -1, channels)
    apply = jax.jit(model.apply, static_argnames="capture")

    def forward(x, sigma, rope, prefix, capture=None):
        timesteps = jnp.full(x.shape[:2], sigma * np.float32(config.timestep_scale_multiplier), jnp.float32)
        return apply({"params": params}, x, text, timesteps, rope, text_mask, prefix, capture=capture)

    latents = jnp.asarray(latents, jnp.float32)
    _, (sink_k, sink_v) = forward(tokens(latents[:, :sink_size]), sigma=jnp.float32(0),
                                  rope=frame_rope(config, range(sink_size), height, width, fps), prefix=None,
                                  capture="pre_rope")
    history_k = history_v = None
    history_frames = 0
    refined = [latents[:, :sink_size]]
    bounds = block_bounds(num_frames, sink_size, block_size)
    for start, end in tqdm(bounds, desc="refining blocks", disable=not progress, file=sys.stderr):
        offset = start - history_frames - sink_size
        prefix = KVPrefix(sink_k, sink_v, frame_rope(config, range(offset, offset + sink_size), height, width, fps),
                          history_k, history_v)
        rope = frame_rope(config, range(start, end), height, width, fps)
        x = (1.0 - sigmas[0]) * latents[:, start:end] + sigmas[0] * jnp.asarray(noise[:, start:end], jnp.float32)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = forward(tokens(x), sigma=sigma, rope=rope, prefix=prefix).astype(jnp.float32)
            denoised = tokens(x) - velocity * sigma
            x = euler_update(tokens(x), denoised, sigma, sigma_next).reshape(x.shape)
        _, (new_k, new_v) = forward(tokens(x), sigma=jnp.float32(0), rope=rope, prefix=prefix, capture="post_rope")
        history_k = new_k if history_k is None else jnp.concatenate([history_k, new_k], axis=2)
        history_v = new_v if history_v is None else jnp.concatenate([history_v, new_v], axis=2)
        history_frames += end - start
        if 0 < max_history < history_frames:
            keep = max_history * tokens_per_frame
            history_k, history_v = history_k[:, :, -keep:], history_v[:, :, -keep:]
            history_frames = max_history
        refined.append(x)
        if on_block is not None:
            on_block(start, end, x)
    return jnp.concatenate(refined, axis=1)


def euler_update(x, denoised, sigma, sigma_next):
    """The pipeline's step from an x0 prediction: sigma 0 returns x0; otherwise the velocity (x - x0) / sigma and
    diffusers' flow-matching Euler step x + (sigma_next - sigma) * velocity."""
    if sigma <= 1e-6:
        return denoised
    velocity = (x - denoised) / sigma
    return x + (sigma_next - sigma) * velocity
