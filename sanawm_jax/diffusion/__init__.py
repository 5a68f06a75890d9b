"""Flow-matching scheduler and the stage-1 sampler."""

from sanawm_jax.diffusion.sampler import initial_noise, sample
from sanawm_jax.diffusion.scheduler import (
    SamplerConfig,
    euler_step,
    flow_sigmas,
    flow_timesteps,
)

__all__ = ["SamplerConfig", "euler_step", "flow_sigmas", "flow_timesteps", "initial_noise", "sample"]
