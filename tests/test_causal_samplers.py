"""Samplers of the causal modes: the chunk-wise flow Euler schedule of the chunk-causal teacher and the few-step
streaming sampler of the student.

References are upstream's algorithms written out literally (NVlabs/Sana `ChunkFlowEuler.sample`: the model on the
prefix of started chunks only; `SelfForcingFlowEulerCamCtrl.sample_chunks`: each block denoised against the caches
the t = 0 passes of the earlier blocks wrote, here as the chunk-causal model re-run on the clean earlier blocks at
t = 0). Both run the same float32 model, so outputs agree up to the chunk-causal FFN's 1e-5 round-off carried
through a few Euler steps: bound 1e-4 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanawm_jax.demo import random_params
from sanawm_jax.diffusion.chunked import chunk_schedule, sample_chunk_causal
from sanawm_jax.diffusion.scheduler import SamplerConfig, euler_step, flow_sigmas, flow_timesteps
from sanawm_jax.diffusion.streaming import StreamingSamplerConfig, stream_sample
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params
from tests.test_chunk_causal import model_inputs, rel

SAMPLER_REL_TOL = 1e-4
# Two blocks, one of each kind: the references compile the model once per prefix length.
TINY = PRESETS["sana_wm_tiny"].replace(num_layers=2, softmax_every_n=2, chunk_plucker_post_attn_blocks=2)


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(abstract_params(TINY), np.random.default_rng(0))


def test_chunk_schedule_staggers_chunks():
    """Upstream: chunk j starts at int(j * k * N) (k = 1/J by default), -1 before, 0 after its N steps."""
    steps = np.array([1000.0, 750.0, 500.0, 250.0], np.float32)
    expected = np.array([
        [1000, -1, -1], [750, 1000, -1], [500, 750, 1000], [250, 500, 750], [0, 250, 500], [0, 0, 250],
    ], np.float32)
    np.testing.assert_array_equal(chunk_schedule(steps, 3), expected)
    halves = chunk_schedule(steps, 3, interval_k=0.5)  # starts 0, 2, 4 -> 8 global steps
    assert halves.shape == (8, 3) and halves[2].tolist() == [500, 1000, -1] and halves[4].tolist() == [0, 500, 1000]
    with pytest.raises(ValueError, match="interval_k"):
        chunk_schedule(steps, 3, interval_k=0.0)


def test_streaming_config_checks_the_step_list():
    assert StreamingSamplerConfig().sigmas().tolist() == pytest.approx([1.0, 0.96, 0.889, 0.727, 0.0])
    # The released list is shift 8 applied to the uniform grid 1, 0.75, 0.5, 0.25 (rounded to integer steps).
    uniform = np.array([1.0, 0.75, 0.5, 0.25])
    assert np.round(1000 * 8 * uniform / (1 + 7 * uniform)).tolist() == [1000, 960, 889, 727]
    for bad in ((1000, 500), (1000, 0, 500, 0), (1200, 0)):
        with pytest.raises(ValueError, match="denoising_steps"):
            StreamingSamplerConfig(denoising_steps=bad)


def sampler_inputs(frames):
    inputs = model_inputs(TINY, frames, seed=4)
    return {
        "first_frame_latent": inputs["latents"][:, :1],
        "noise": inputs["latents"],
        "text": inputs["text"],
        "text_mask": inputs["text_mask"],
        "camera_conditions": inputs["camera_conditions"],
        "chunk_plucker": inputs["chunk_plucker"],
    }


@pytest.mark.slow
def test_chunk_sampler_equals_prefix_only_schedule(tiny_params):
    frames, config = 7, SamplerConfig(num_steps=3, guidance_scale=1.0, shift=3.0)
    model = SanaWMTransformer(TINY.replace(mode="chunk_causal"))
    args = sampler_inputs(frames)
    ours = sample_chunk_causal(model, tiny_params, config=config, progress=False, **args)

    sigmas = flow_sigmas(config.num_steps, config.shift)
    bounds = [(0, 4), (4, 7)]
    schedule = chunk_schedule(flow_timesteps(sigmas), len(bounds))
    latents = args["noise"].at[:, :1].set(args["first_frame_latent"])
    apply = jax.jit(model.apply)
    for row in schedule:
        active = [j for j in range(len(bounds)) if row[j] >= 0]
        end = bounds[active[-1]][1]
        per_frame = np.concatenate([[row[j]] * (b - a) for j, (a, b) in enumerate(bounds) if j in active])
        per_frame[0] = 0.0
        t = jnp.asarray(per_frame)[None]
        velocity = apply({"params": tiny_params}, latents[:, :end], t, args["text"], args["text_mask"],
                         camera_conditions=args["camera_conditions"][:, :end],
                         chunk_plucker=args["chunk_plucker"][:, :end])
        latents = latents.at[:, :end].set(euler_step(latents[:, :end], velocity, t, jnp.asarray(sigmas)))
    assert rel(ours, latents) <= SAMPLER_REL_TOL


@pytest.mark.slow
def test_streaming_sampler_equals_chunk_causal_rerun_on_clean_prefix(tiny_params):
    """Blocks 0-3 and 4-6 (the window of num_cached_blocks 2 covers the clip)."""
    frames, config = 7, StreamingSamplerConfig()
    args = sampler_inputs(frames)
    model = SanaWMTransformer(TINY.replace(mode="streaming"))
    blocks = list(stream_sample(model, tiny_params, config=config, **args))
    assert [(b.start, b.end) for b in blocks] == [(0, 4), (4, 7)]
    ours = jnp.concatenate([b.latents for b in blocks], axis=1)
    np.testing.assert_array_equal(ours[:, 0], args["first_frame_latent"][:, 0])

    apply = jax.jit(SanaWMTransformer(TINY.replace(mode="chunk_causal")).apply)
    sigmas = config.sigmas()
    latents = args["noise"].at[:, :1].set(args["first_frame_latent"])
    for start, end in [(0, 4), (4, 7)]:
        for sigma in sigmas[:-1]:
            t = np.zeros((1, end), np.float32)
            t[:, start:] = sigma * 1000
            t[:, 0] = 0.0
            velocity = apply({"params": tiny_params}, latents[:, :end], jnp.asarray(t), args["text"],
                             args["text_mask"], camera_conditions=args["camera_conditions"][:, :end],
                             chunk_plucker=args["chunk_plucker"][:, :end])
            stepped = euler_step(latents[:, start:end], velocity[:, start:end], jnp.asarray(t[:, start:end]),
                                 jnp.asarray(sigmas))
            latents = latents.at[:, start + (start == 0):end].set(stepped[:, int(start == 0):])
    assert rel(ours, latents) <= SAMPLER_REL_TOL
