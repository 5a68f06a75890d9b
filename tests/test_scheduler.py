"""The flow-matching grid and per-token Euler step equal diffusers' `FlowMatchEulerDiscreteScheduler`.

The grid is computed with the same float64 -> float32 rounding as diffusers, so σ and timesteps are compared exactly;
the Euler step is float32 arithmetic in both and is compared at 1e-6 absolute (one float32 rounding of values of
order 1, in case the two evaluation orders differ by an ulp).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sanawm_jax.diffusion.scheduler import (
    SamplerConfig,
    euler_step,
    flow_sigmas,
    flow_timesteps,
    next_sigmas,
)

GRID_CASES = [(n, s) for n in (1, 4, 60) for s in (1.0, 8.0, 9.8)]


def diffusers_grid(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps,shift", GRID_CASES)
def test_sigmas_equal_diffusers(num_steps, shift):
    ours = flow_sigmas(num_steps, shift)
    expected = diffusers_grid(num_steps, shift).sigmas.numpy()
    assert ours.dtype == np.float32 and ours.shape == (num_steps + 1,)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("num_steps,shift", GRID_CASES)
def test_timesteps_equal_diffusers(num_steps, shift):
    ours = flow_timesteps(flow_sigmas(num_steps, shift))
    expected = diffusers_grid(num_steps, shift).timesteps.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_grid_runs_from_one_down_to_appended_zero():
    sigmas = flow_sigmas(5, 8.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas[-2] > 0.0
    assert np.all(np.diff(sigmas) < 0)


def test_next_sigma_is_largest_grid_value_strictly_below():
    sigmas = jnp.asarray(flow_sigmas(4, 8.0))
    query = jnp.stack([sigmas[0], sigmas[2], (sigmas[1] + sigmas[2]) / 2, sigmas[3], jnp.float32(0.0)])
    expected = np.array([sigmas[1], sigmas[3], sigmas[2], sigmas[4], 0.0])
    np.testing.assert_array_equal(next_sigmas(query, sigmas), expected)


@pytest.mark.parametrize("shift", [1.0, 8.0])
def test_per_token_euler_step_equals_diffusers(shift):
    num_steps, batch, tokens, channels = 6, 2, 10, 3
    scheduler = diffusers_grid(num_steps, shift)
    rng = np.random.default_rng(0)
    grid_timesteps = flow_timesteps(flow_sigmas(num_steps, shift))
    # Tokens at various grid timesteps, including clean tokens (t = 0) as the pinned first frame has.
    per_token = rng.choice(np.append(grid_timesteps, 0.0).astype(np.float32), size=(batch, tokens))
    sample = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    velocity = rng.standard_normal((batch, tokens, channels)).astype(np.float32)

    expected = scheduler.step(
        -torch.from_numpy(velocity), scheduler.timesteps[0], torch.from_numpy(sample),
        per_token_timesteps=torch.from_numpy(per_token), return_dict=False,
    )[0].numpy()
    ours = euler_step(jnp.asarray(sample), jnp.asarray(velocity), jnp.asarray(per_token), flow_sigmas(num_steps, shift))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_clean_tokens_do_not_move():
    sample = jnp.ones((1, 3, 2, 2, 4))
    velocity = jnp.full((1, 3, 2, 2, 4), 7.0)
    frame_timesteps = jnp.array([[0.0, 1000.0, 1000.0]])
    stepped = euler_step(sample, velocity, frame_timesteps, flow_sigmas(3, 8.0))
    np.testing.assert_array_equal(stepped[:, 0], sample[:, 0])
    assert not np.allclose(stepped[:, 1:], sample[:, 1:])


def test_step_rejects_timesteps_that_do_not_lead_the_sample_shape():
    with pytest.raises(ValueError, match="leading sub-shape"):
        euler_step(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 4)), jnp.zeros((3,)), flow_sigmas(2, 1.0))


@pytest.mark.parametrize("changes", [dict(num_steps=0), dict(shift=0.0), dict(guidance_scale=-1.0)])
def test_sampler_config_rejects_bad_values(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        SamplerConfig(**changes)
