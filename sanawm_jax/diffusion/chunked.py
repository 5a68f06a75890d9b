"""Chunk-wise flow Euler sampling of the chunk-causal teacher (upstream's `ChunkFlowEuler`, NVlabs/Sana
`diffusion/scheduler/flow_euler_sampler.py`).

A staggered schedule over the chunks of the chunk layout: chunk j starts the N-step Euler schedule at global step
⌊j·k·N⌋ (k = `interval_k`, default 1 / number of chunks, as the released CLI's `--chunk_interval_k`) and is held at
t = 0 once done, so earlier chunks are cleaner than later ones and the run takes ⌊(J−1)·k·N⌋ + N global steps.
Upstream feeds the model the prefix of started chunks only; since the model is chunk-causal, frames of chunks that have
not started cannot reach the started ones, so here every global step runs the whole clip (not-started chunks at
t = 1000, left as they are): one compiled program for every global step. Frame 0 is the clean conditioning frame.

    latents = sample_chunk_causal(model, params, first_frame_latent=..., noise=..., text=..., text_mask=...,
                                  negative_text=..., negative_text_mask=..., camera_conditions=..., chunk_plucker=...,
                                  config=SamplerConfig(num_steps=60, guidance_scale=5.0, shift=9.8))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sanawm_jax.diffusion.sampler import Conditioning, guidance_conditioning, guided_velocity
from sanawm_jax.diffusion.scheduler import NUM_TRAIN_TIMESTEPS, SamplerConfig, euler_step, flow_sigmas, flow_timesteps
from sanawm_jax.models.sana_wm.chunks import chunk_ids


def chunk_schedule(timesteps: np.ndarray, num_chunks: int, interval_k: float | None = None) -> np.ndarray:
    """(G, J) float32 timestep of chunk j at global step g: −1 before the chunk starts, then the N grid timesteps,
    then 0. Chunk j starts at int(j · interval_k · N); interval_k defaults to 1 / J."""
    num_steps = len(timesteps)
    interval_k = 1.0 / num_chunks if interval_k is None else interval_k
    if interval_k <= 0:
        raise ValueError(f"interval_k must be > 0, got {interval_k}")
    starts = [int(j * float(interval_k) * num_steps) for j in range(num_chunks)]
    schedule = np.full((starts[-1] + num_steps, num_chunks), -1.0, np.float32)
    for j, start in enumerate(starts):
        schedule[start : start + num_steps, j] = timesteps
        schedule[start + num_steps :, j] = 0.0
    return schedule


@functools.partial(jax.jit, static_argnames=("model", "use_guidance"))
def chunk_step(model, params, latents, frame_schedule, sigmas, guidance_scale, conditioning: Conditioning,
               use_guidance):
    """One global step: frame_schedule (T,) per-frame timesteps (−1: chunk not started). Frames not started see
    t = 1000 and stay; frame 0 sees t = 0 and stays. latents (B, T, H, W, C) -> same, float32."""
    b, t = latents.shape[:2]
    started = frame_schedule >= 0
    frame_timesteps = jnp.where(started, frame_schedule, float(NUM_TRAIN_TIMESTEPS)).at[0].set(0.0)
    frame_timesteps = jnp.broadcast_to(frame_timesteps, (b, t))
    velocity = guided_velocity(model, params, latents, frame_timesteps, guidance_scale, conditioning, use_guidance)
    stepped = euler_step(latents, velocity, frame_timesteps, sigmas)
    return jnp.where(started[None, :, None, None, None], stepped, latents).at[:, :1].set(latents[:, :1])


def sample_chunk_causal(model, params, *, first_frame_latent, noise, text, text_mask, negative_text=None,
                        negative_text_mask=None, camera_conditions=None, chunk_plucker=None,
                        config: SamplerConfig = SamplerConfig(), interval_k: float | None = None,
                        progress: bool = True) -> jnp.ndarray:
    """Denoise (B, T, H, W, C) latents with the staggered chunk schedule; arguments as `sampler.sample`.

    The model's config must be chunk-causal (its `chunk_layout` gives the chunks). Returns float32 latents.
    """
    num_frames = noise.shape[1]
    starts = model.config.chunk_layout(num_frames)
    if starts is None:
        raise ValueError("the chunk-wise sampler needs a chunk-causal model (config.mode 'chunk_causal')")
    use_guidance = config.uses_guidance
    conditioning = guidance_conditioning(text, text_mask, negative_text, negative_text_mask, camera_conditions,
                                         chunk_plucker, use_guidance)
    sigmas = flow_sigmas(config.num_steps, config.shift)
    schedule = chunk_schedule(flow_timesteps(sigmas), len(starts), interval_k)
    frame_schedule = jnp.asarray(schedule[:, chunk_ids(starts, num_frames)])  # (G, T)
    latents = jnp.asarray(noise, jnp.float32).at[:, :1].set(jnp.asarray(first_frame_latent, jnp.float32))
    sigmas, guidance_scale = jnp.asarray(sigmas), jnp.float32(config.guidance_scale)
    for g in tqdm(range(len(schedule)), desc="chunk-wise denoising", disable=not progress):
        latents = chunk_step(model, params, latents, frame_schedule[g], sigmas, guidance_scale, conditioning,
                             use_guidance)
    return latents
