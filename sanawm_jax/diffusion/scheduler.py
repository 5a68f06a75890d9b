"""Shifted flow-matching grid and the per-token Euler update used by stage-1 sampling.

Flow matching here means x_σ = (1 − σ)·x0 + σ·ε with the model predicting the velocity v = ε − x0; sampling walks
σ from 1 down to 0. The grid reproduces diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)` after
`set_timesteps(N)`, rounding included, so timesteps fed to the model match the released pipeline bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sanawm_jax.frozen_config import FrozenConfig

NUM_TRAIN_TIMESTEPS = 1000
# Grid sigmas must lie this far below a token's sigma to count as "next"; it keeps float32 round-off in t/1000
# from selecting the token's own sigma again.
NEXT_SIGMA_MARGIN = 1e-6


@dataclasses.dataclass(frozen=True)
class SamplerConfig(FrozenConfig):
    """Stage-1 sampling settings.

    num_steps: Euler steps over the shifted grid (60 in the release).
    guidance_scale: classifier-free guidance weight on text; <= 1 runs the conditional branch only.
    shift: timestep shift s (9.8 in the released inference config, 8.0 in the upstream scripts and benchmark).
    """

    num_steps: int = 60
    guidance_scale: float = 5.0
    shift: float = 9.8

    def __post_init__(self):
        self.check([
            (self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}"),
            (self.shift > 0, f"shift must be > 0, got {self.shift}"),
            (self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}"),
        ])

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


def shift_sigmas(sigmas, shift):
    """σ' = s·σ / (1 + (s − 1)·σ), elementwise in the dtype of `sigmas` (numpy or jax); maps [0, 1] onto [0, 1]."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _shift_float32(sigma: np.float32, shift: float) -> np.float32:
    """`shift_sigmas` in float32 with the Python float `shift` as a weak scalar (NumPy >= 2), as torch evaluates it
    for a float32 tensor: s and s − 1 are each rounded to float32."""
    return shift_sigmas(np.float32(sigma), float(shift))


def flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """The shifted σ grid, (num_steps + 1,) float32, from 1 down to a last σ > 0, followed by an appended 0.

    σ_min is the shifted smallest training σ (1/1000), computed in float32 as at scheduler construction; the grid is
    linspace(1, σ_min, N) shifted again (so its lower end is shifted twice, as upstream's) in float64 and rounded
    to float32.
    """
    if num_steps < 1 or not shift > 0:
        raise ValueError(f"flow_sigmas needs num_steps >= 1 and shift > 0, got num_steps={num_steps}, shift={shift}")
    sigma_max = float(_shift_float32(np.float32(1.0), shift))
    sigma_min = float(_shift_float32(np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS), shift))
    linear = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    linear = linear / NUM_TRAIN_TIMESTEPS
    shifted = shift_sigmas(linear, shift)
    return np.append(shifted.astype(np.float32), np.float32(0.0))


def flow_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """Model timesteps of each step, (N,) float32 in (0, 1000]: 1000·σ for every σ of the grid but the final 0."""
    return sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)


def next_sigmas(sigma: jnp.ndarray, sigmas: jnp.ndarray) -> jnp.ndarray:
    """For each σ, the largest grid σ strictly below it (0 when none is): same shape as `sigma`."""
    grid = sigmas.reshape(sigmas.shape + (1,) * sigma.ndim)
    below = grid < sigma - NEXT_SIGMA_MARGIN
    return jnp.max(jnp.where(below, grid, 0.0), axis=0)


def euler_step(sample: jnp.ndarray, velocity: jnp.ndarray, timesteps: jnp.ndarray, sigmas: jnp.ndarray) -> jnp.ndarray:
    """One flow-matching Euler step with a timestep per token (or per frame), in float32.

    sample, velocity: same shape S, e.g. (B, T, H, W, C); velocity is the model's v = ε − x0.
    timesteps: shape S[:k] for some k < len(S) — per token (B, T, H, W) or per frame (B, T) — in [0, 1000].
    sigmas: the grid from `flow_sigmas`, (N + 1,).
    Each token at σ = t/1000 moves to the next grid σ below it: x ← x − (σ − σ_next)·v; tokens at σ = 0 stay.
    Returns the new sample, shape S, float32.
    """
    if sample.shape != velocity.shape:
        raise ValueError(f"sample {sample.shape} and velocity {velocity.shape} must have the same shape")
    if timesteps.ndim >= sample.ndim or sample.shape[: timesteps.ndim] != timesteps.shape:
        raise ValueError(f"timesteps {timesteps.shape} must be a leading sub-shape of the sample {sample.shape}")
    sigma = timesteps.astype(jnp.float32) / NUM_TRAIN_TIMESTEPS
    step = sigma - next_sigmas(sigma, sigmas.astype(jnp.float32))
    step = step.reshape(step.shape + (1,) * (sample.ndim - step.ndim))
    return sample.astype(jnp.float32) - step * velocity.astype(jnp.float32)
