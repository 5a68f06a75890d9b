"""Stage-1 sampling: denoise all latent frames jointly with the per-token flow-matching Euler scheduler.

Latent frame 0 holds the encoded first image and stays clean (its timestep is 0 at every step); the other frames start
from Gaussian noise and walk down the shifted σ grid. Classifier-free guidance acts on text only: one model call
carries the batch [unconditional; conditional] with the camera tensors duplicated into both halves, and the velocity
is v = v_uncond + w·(v_cond − v_uncond).

    noise = initial_noise(jax.random.key(seed), first_frame_latent, num_latent_frames)
    latents = sample(model, params, first_frame_latent=..., noise=noise, text=..., text_mask=...,
                     negative_text=..., negative_text_mask=..., camera_conditions=..., chunk_plucker=...,
                     config=SamplerConfig(num_steps=60, guidance_scale=5.0, shift=9.8))

Latents stay float32 between steps whatever the model's compute dtype.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from sanawm_jax.diffusion.scheduler import (
    SamplerConfig,
    euler_step,
    flow_sigmas,
    flow_timesteps,
)
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer


class Conditioning(NamedTuple):
    """Model inputs that stay fixed across steps, already batched for guidance (B' = 2B with CFG, else B).

    text (B', L, D), text_mask (B', L), camera_conditions (B', T, 20) or None, chunk_plucker (B', T, H, W, 48) or None.
    """

    text: jnp.ndarray
    text_mask: jnp.ndarray
    camera_conditions: jnp.ndarray | None
    chunk_plucker: jnp.ndarray | None


def initial_noise(rng: jax.Array, first_frame_latent: jnp.ndarray, num_latent_frames: int) -> jnp.ndarray:
    """Standard normal noise (B, num_latent_frames, H, W, C) float32 for a first-frame latent (B, 1, H, W, C)."""
    if first_frame_latent.ndim != 5 or first_frame_latent.shape[1] != 1:
        raise ValueError(f"first_frame_latent must be (B, 1, H, W, C), got {first_frame_latent.shape}")
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    b, _, h, w, c = first_frame_latent.shape
    return jax.random.normal(rng, (b, num_latent_frames, h, w, c), jnp.float32)


def pad_tokens(text: jnp.ndarray, text_mask: jnp.ndarray, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Right-pad text (B, L, D) with zero states and text_mask (B, L) with zeros to `length` tokens."""
    pad = length - text.shape[1]
    return jnp.pad(text, ((0, 0), (0, pad), (0, 0))), jnp.pad(text_mask, ((0, 0), (0, pad)))


def guidance_conditioning(
    text, text_mask, negative_text, negative_text_mask, camera_conditions, chunk_plucker, use_guidance: bool
) -> Conditioning:
    """Stack [negative; positive] text (padded to one length) and duplicate the camera tensors when guiding."""
    if not use_guidance:
        return Conditioning(text, text_mask, camera_conditions, chunk_plucker)
    length = max(text.shape[1], negative_text.shape[1])
    text, text_mask = pad_tokens(text, text_mask, length)
    negative_text, negative_text_mask = pad_tokens(negative_text, negative_text_mask, length)
    twice = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
    return Conditioning(
        text=jnp.concatenate([negative_text, text], axis=0),
        text_mask=jnp.concatenate([negative_text_mask, text_mask], axis=0),
        camera_conditions=twice(camera_conditions),
        chunk_plucker=twice(chunk_plucker),
    )


def guided_velocity(model, params, latents, frame_timesteps, guidance_scale, conditioning: Conditioning,
                    use_guidance):
    """The model's velocity (B, T, H, W, C) float32 at per-frame timesteps (B, T), text-guided when `use_guidance`
    (one call on the batch [unconditional; conditional])."""
    copies = 2 if use_guidance else 1
    velocity = model.apply(
        {"params": params},
        jnp.concatenate([latents] * copies, axis=0),
        jnp.concatenate([frame_timesteps] * copies, axis=0),
        conditioning.text,
        conditioning.text_mask,
        camera_conditions=conditioning.camera_conditions,
        chunk_plucker=conditioning.chunk_plucker,
    ).astype(jnp.float32)
    if use_guidance:
        uncond, cond = jnp.split(velocity, 2, axis=0)
        velocity = uncond + guidance_scale * (cond - uncond)
    return velocity


@functools.partial(jax.jit, static_argnames=("model", "use_guidance"))
def denoise_step(model, params, latents, timestep, sigmas, guidance_scale, conditioning: Conditioning, use_guidance):
    """One sampling step at grid timestep `timestep` (scalar): latents (B, T, H, W, C) -> (B, T, H, W, C) float32.

    Compiled once per (model, shapes, use_guidance): the timestep, σ grid and guidance scale are traced arguments.
    """
    b, t = latents.shape[:2]
    # Frame 0 is the clean conditioning frame: timestep 0 for the model and no Euler move.
    frame_timesteps = jnp.broadcast_to(jnp.where(jnp.arange(t) == 0, 0.0, timestep), (b, t)).astype(jnp.float32)
    velocity = guided_velocity(model, params, latents, frame_timesteps, guidance_scale, conditioning, use_guidance)
    stepped = euler_step(latents, velocity, frame_timesteps, sigmas)
    return stepped.at[:, :1].set(latents[:, :1])


def _print_progress(step, total, enabled):
    if enabled:
        end = "\n" if int(step) == int(total) else ""
        print(f"\rdenoising step {int(step)}/{int(total)}", end=end, file=sys.stderr, flush=True)


@functools.partial(jax.jit, static_argnames=("model", "use_guidance"))
def denoise_all(model, params, latents, timesteps, sigmas, guidance_scale, conditioning, use_guidance, progress):
    """Every step of `timesteps` (N,) in one XLA program (`lax.fori_loop`).

    Each step calls back to the host, which prints a progress line when the traced flag `progress` is set (so one
    program serves both settings).
    """
    num_steps = timesteps.shape[0]

    def body(i, x):
        jax.debug.callback(_print_progress, i + 1, num_steps, progress)
        return denoise_step(model, params, x, timesteps[i], sigmas, guidance_scale, conditioning, use_guidance)

    return jax.lax.fori_loop(0, num_steps, body, latents)


def _check_inputs(first_frame_latent, noise, text, text_mask, negative_text, negative_text_mask, use_guidance):
    if first_frame_latent.ndim != 5 or first_frame_latent.shape[1] != 1:
        raise ValueError(f"first_frame_latent must be (B, 1, H, W, C), got {first_frame_latent.shape}")
    b, _, h, w, c = first_frame_latent.shape
    if noise.ndim != 5 or noise.shape[0] != b or noise.shape[2:] != (h, w, c):
        raise ValueError(f"noise must be (B, T, H, W, C) = ({b}, T, {h}, {w}, {c}), got {noise.shape}")
    texts = [("text", text, text_mask)]
    if use_guidance:
        if negative_text is None or negative_text_mask is None:
            raise ValueError("guidance_scale > 1 needs negative_text and negative_text_mask")
        texts.append(("negative_text", negative_text, negative_text_mask))
    for name, states, mask in texts:
        if states.ndim != 3 or states.shape[0] != b or states.shape[2] != text.shape[2]:
            raise ValueError(f"{name} must be (B={b}, L, D={text.shape[2]}), got {states.shape}")
        if mask.shape != states.shape[:2]:
            raise ValueError(f"{name}_mask must be {states.shape[:2]}, got {mask.shape}")


def sample(
    model: SanaWMTransformer,
    params,
    *,
    first_frame_latent: jnp.ndarray,
    noise: jnp.ndarray,
    text: jnp.ndarray,
    text_mask: jnp.ndarray,
    negative_text: jnp.ndarray | None = None,
    negative_text_mask: jnp.ndarray | None = None,
    camera_conditions: jnp.ndarray | None = None,
    chunk_plucker: jnp.ndarray | None = None,
    config: SamplerConfig = SamplerConfig(),
    fused: bool = False,
    progress: bool = True,
) -> jnp.ndarray:
    """Denoise a video's latents from noise, frame 0 pinned to the encoded first image.

    Args:
        model, params: the DiT and its parameters.
        first_frame_latent: (B, 1, H, W, C) normalised VAE latent of the first image.
        noise: (B, T, H, W, C) starting noise (`initial_noise`); its frame 0 is replaced by `first_frame_latent`.
        text, text_mask: (B, L, D) text-encoder states and (B, L) 0/1 mask of the prompt.
        negative_text, negative_text_mask: (B, L', D), (B, L') of the negative prompt; needed when guiding.
        camera_conditions: (B, T, 20) or None; chunk_plucker: (B, T, H, W, 48) or None.
        config: steps, guidance scale and shift.
        fused: run all steps as one compiled `fori_loop` instead of one compiled step per Python iteration.
        progress: show a progress bar (per step; a host callback line when fused).

    Returns:
        (B, T, H, W, C) float32 denoised latents.
    """
    use_guidance = config.uses_guidance
    _check_inputs(first_frame_latent, noise, text, text_mask, negative_text, negative_text_mask, use_guidance)
    conditioning = guidance_conditioning(
        text, text_mask, negative_text, negative_text_mask, camera_conditions, chunk_plucker, use_guidance
    )
    sigmas = flow_sigmas(config.num_steps, config.shift)
    timesteps = jnp.asarray(flow_timesteps(sigmas))
    sigmas = jnp.asarray(sigmas)
    guidance_scale = jnp.float32(config.guidance_scale)
    latents = jnp.asarray(noise, jnp.float32).at[:, :1].set(jnp.asarray(first_frame_latent, jnp.float32))

    if fused:
        return denoise_all(model, params, latents, timesteps, sigmas, guidance_scale, conditioning, use_guidance,
                           jnp.bool_(progress))
    for i in tqdm(range(config.num_steps), desc="denoising", disable=not progress):
        latents = denoise_step(model, params, latents, timesteps[i], sigmas, guidance_scale, conditioning,
                               use_guidance)
        if progress:
            latents.block_until_ready()
    return latents
