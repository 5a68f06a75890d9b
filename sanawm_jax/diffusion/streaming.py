"""Few-step streaming sampling of the self-forcing student (upstream's `SelfForcingFlowEulerCamCtrl`, NVlabs/Sana
`diffusion/scheduler/self_forcing_flow_euler_sampler.py`, with the defaults of
`inference_video_scripts/wm/inference_sana_wm_streaming.py`).

Blocks of latent frames are generated left to right (`models.sana_wm.streaming.block_bounds`: chunk_frames + 1 frames
for block 0, which holds the clean first-frame latent, then chunk_frames). Each block starts from its slice of the
noise and takes one deterministic flow-Euler step per entry of `denoising_steps` (σ = t / 1000 verbatim, the grid
already shifted: 1000, 960, 889, 727 are shift 8 applied to 1, 0.75, 0.5, 0.25), reading the stream state but not
changing it; then the clean block is run once more at t = 0 and that pass's state is carried to the next block.
Guidance is distilled into the student (cfg_scale 1): one model call per step. Every block after the first runs the
same compiled program (`denoise_block`), so a video of any length compiles twice.

    for block in stream_sample(model, params, first_frame_latent=..., noise=..., text=..., text_mask=...,
                               camera_conditions=..., chunk_plucker=...):
        decode(block.latents)   # (B, frames, H, W, C) float32, as soon as the block is done
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.diffusion.scheduler import NUM_TRAIN_TIMESTEPS, euler_step
from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.models.sana_wm.streaming import block_bounds, init_stream_state, is_first_block


@dataclasses.dataclass(frozen=True)
class StreamingSamplerConfig(FrozenConfig):
    """denoising_steps: the student's timesteps, decreasing, ending in 0 (the released CLI's --denoising_step_list)."""

    denoising_steps: tuple[int, ...] = (1000, 960, 889, 727, 0)

    def __post_init__(self):
        object.__setattr__(self, "denoising_steps", tuple(int(t) for t in self.denoising_steps))
        steps = self.denoising_steps
        self.check([
            (len(steps) >= 2 and steps[-1] == 0, f"denoising_steps must have >= 2 entries and end with 0, got {steps}"),
            (all(a > b for a, b in zip(steps, steps[1:])), f"denoising_steps must decrease, got {steps}"),
            (steps[0] <= NUM_TRAIN_TIMESTEPS, f"denoising_steps must lie in [0, {NUM_TRAIN_TIMESTEPS}], got {steps}"),
        ])

    def sigmas(self) -> np.ndarray:
        """(N + 1,) float32 σ grid t / 1000, ending in 0."""
        return np.asarray(self.denoising_steps, np.float32) / np.float32(NUM_TRAIN_TIMESTEPS)


class Block(NamedTuple):
    """One generated block: its index, frames [start, end) of the clip and latents (B, end − start, H, W, C)."""

    index: int
    start: int
    end: int
    latents: jax.Array


@functools.partial(jax.jit, static_argnames=("model",))
def denoise_block(model, params, noisy, state, sigmas, text, text_mask, camera_conditions, chunk_plucker):
    """Denoise one block and fill the caches: noisy (B, F, H, W, C) -> (latents (B, F, H, W, C) float32, state after
    the block). Frame 0 of block 0 is the clean conditioning frame (t = 0, never moved)."""
    b, f = noisy.shape[:2]
    clean = jnp.asarray((np.arange(f) == 0) & is_first_block(model.config, f))
    noisy = noisy.astype(jnp.float32)

    def run(latents, frame_timesteps):
        return model.apply({"params": params}, latents, frame_timesteps, text, text_mask,
                           camera_conditions=camera_conditions, chunk_plucker=chunk_plucker, stream_state=state)

    def step(latents, sigma):
        frame_timesteps = jnp.broadcast_to(jnp.where(clean, 0.0, sigma * NUM_TRAIN_TIMESTEPS), (b, f))
        velocity, _ = run(latents, frame_timesteps)
        stepped = euler_step(latents, velocity.astype(jnp.float32), frame_timesteps, sigmas)
        return jnp.where(clean[None, :, None, None, None], noisy, stepped), None

    latents, _ = jax.lax.scan(step, noisy, sigmas[:-1])
    _, next_state = run(latents, jnp.zeros((b, f), jnp.float32))
    return latents, next_state


def stream_sample(model, params, *, first_frame_latent, noise, text, text_mask, camera_conditions=None,
                  chunk_plucker=None, config: StreamingSamplerConfig = StreamingSamplerConfig()) -> Iterator[Block]:
    """Yield the denoised blocks of a clip in order.

    first_frame_latent (B, 1, H, W, C); noise (B, T, H, W, C) with T = chunk_frames·k + 1 (its frame 0 is replaced by
    the first-frame latent); text (B, L, D), text_mask (B, L); camera_conditions (B, T, 20) and chunk_plucker
    (B, T, H, W, 48), or None. The model must be in mode "streaming".
    """
    cfg = model.config
    b, num_frames, height, width, _ = noise.shape
    bounds = block_bounds(cfg, num_frames)
    latents = jnp.asarray(noise, jnp.float32).at[:, :1].set(jnp.asarray(first_frame_latent, jnp.float32))
    state = init_stream_state(cfg, b, height, width, with_camera=camera_conditions is not None)
    sigmas = jnp.asarray(config.sigmas())
    piece = lambda a, start, end: None if a is None else a[:, start:end]
    for index, (start, end) in enumerate(bounds):
        block, state = denoise_block(model, params, latents[:, start:end], state, sigmas, text, text_mask,
                                     piece(camera_conditions, start, end), piece(chunk_plucker, start, end))
        yield Block(index, start, end, block)
