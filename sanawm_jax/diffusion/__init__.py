"""Flow-matching scheduler and the stage-1 samplers: all frames jointly (bidirectional), the chunk-wise schedule
(chunk-causal teacher) and the few-step block-by-block sampler (streaming student)."""

from sanawm_jax.diffusion.chunked import sample_chunk_causal
from sanawm_jax.diffusion.sampler import initial_noise, sample
from sanawm_jax.diffusion.scheduler import (
    SamplerConfig,
    euler_step,
    flow_sigmas,
    flow_timesteps,
)
from sanawm_jax.diffusion.streaming import StreamingSamplerConfig, stream_sample

__all__ = [
    "SamplerConfig",
    "StreamingSamplerConfig",
    "euler_step",
    "flow_sigmas",
    "flow_timesteps",
    "initial_noise",
    "sample",
    "sample_chunk_causal",
    "stream_sample",
]
