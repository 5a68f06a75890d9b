"""The chunk-causal mode of the DiT (`SanaWMConfig.mode = "chunk_causal"`).

Invariants, in float32:
- with one chunk covering every frame the chunk-causal model equals the bidirectional one (which has diffusers
  parity): the same float32 operations, so relative L2 <= 1e-6;
- outputs of chunk k do not move when the inputs of later chunks change, while they do in the bidirectional model.
  Masked softmax logits and the GDN backward reset at chunk starts are exact; the FFN's temporal conv removes its taps
  into a later chunk by subtraction, which leaves float32 round-off of the removed term: bound 1e-5 relative to the
  output's scale. The bidirectional model moves by far more (> 1e-2).
Checked on the tiny preset (whole model) and on one block of each kind at the released 2.6B widths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanawm_jax.demo import random_params
from sanawm_jax.models.sana_wm.chunks import chunk_ids, chunk_starts, same_chunk_ahead
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.layers import LinearPatches, rotary_tables
from sanawm_jax.models.sana_wm.transformer import SanaWMBlock, SanaWMTransformer, abstract_params
from sanawm_jax.models.sana_wm import ucpe
from tests.test_transformer_parity import camera_inputs

ONE_CHUNK_REL_TOL = 1e-6
CAUSAL_REL_TOL = 1e-5
LEAK_MIN = 1e-2
TINY = PRESETS["sana_wm_tiny"]


def test_chunk_layout_follows_upstream():
    assert chunk_starts(13, 3) == (0, 4, 7, 10)
    assert chunk_starts(4, 3) == (0,)
    assert chunk_starts(3, 3) == (0,)
    starts = chunk_starts(41, 3)  # 4, 3 x 11, 4: the remainder joins the last chunk
    sizes = np.diff([*starts, 41])
    assert sizes[0] == 4 and sizes[-1] == 4 and set(sizes[1:-1]) == {3} and len(sizes) == 13
    assert chunk_ids((0, 4, 7), 9).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert same_chunk_ahead((0, 4, 7), 9, 1).tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 0]


def model_inputs(config, frames, seed, height=2, width=3, text_len=4):
    rng = np.random.default_rng(seed)
    conditions, plucker = camera_inputs(rng, 1, frames, height, width)
    return {
        "latents": jnp.asarray(rng.standard_normal((1, frames, height, width, config.in_channels)), jnp.float32),
        "timesteps": jnp.asarray(rng.uniform(0, 1000, (1, frames)), jnp.float32),
        "text": jnp.asarray(rng.standard_normal((1, text_len, config.caption_channels)), jnp.float32),
        "text_mask": jnp.array([[1] * (text_len - 1) + [0]]),
        "camera_conditions": jnp.asarray(conditions),
        "chunk_plucker": jnp.asarray(plucker),
    }


def perturb_from(inputs, first_frame, seed):
    """The same inputs with every per-frame input of frames >= first_frame redrawn."""
    fresh = model_inputs_like(inputs, seed)
    changed = dict(inputs)
    for name in ("latents", "timesteps", "camera_conditions", "chunk_plucker"):
        changed[name] = inputs[name].at[:, first_frame:].set(fresh[name][:, first_frame:])
    return changed


def model_inputs_like(inputs, seed):
    b, t, h, w, c = inputs["latents"].shape
    config = TINY.replace(in_channels=c, caption_channels=inputs["text"].shape[-1])
    return model_inputs(config, t, seed, h, w, inputs["text"].shape[1])


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(abstract_params(TINY), np.random.default_rng(0))


@functools.cache
def jitted_apply(config):
    """One jitted forward per config, so calls with the same shapes compile once."""
    return jax.jit(SanaWMTransformer(config).apply)


def forward(config, params, inputs):
    return jitted_apply(config)({"params": params}, **inputs)


@pytest.mark.parametrize("frames,chunk_frames", [(4, 3), (6, 5)])
def test_one_chunk_equals_bidirectional(tiny_params, frames, chunk_frames):
    inputs = model_inputs(TINY, frames, seed=1)
    causal = TINY.replace(mode="chunk_causal", chunk_frames=chunk_frames)
    assert causal.chunk_layout(frames) == (0,)
    bidirectional = forward(TINY, tiny_params, inputs)
    assert rel(forward(causal, tiny_params, inputs), bidirectional) <= ONE_CHUNK_REL_TOL


def test_later_chunks_do_not_reach_earlier_ones(tiny_params):
    frames = 10  # chunks [0, 4), [4, 7), [7, 10)
    causal = TINY.replace(mode="chunk_causal")
    inputs = model_inputs(TINY, frames, seed=2)
    for config, must_leak in ((causal, False), (TINY, True)):
        reference = forward(config, tiny_params, inputs)
        for start in (4, 7):
            changed = forward(config, tiny_params, perturb_from(inputs, start, seed=3))
            moved = rel(changed[:, :start], reference[:, :start])
            if must_leak:
                assert moved > LEAK_MIN
            else:
                assert moved <= CAUSAL_REL_TOL
                assert rel(changed[:, start:], reference[:, start:]) > LEAK_MIN


RELEASED_WIDTH_GRID = (7, 2, 2)  # frames, height, width of the released-width block checks


def released_width_block_inputs(index):
    """(config, rng, (x, text, text_mask, t_mod, camera conditions, Plücker rays as `LinearPatches`)): float32 inputs
    of block `index` of the 2.6B config (hidden 2240, 20 heads of 112) on a 7-frame 2x2 grid with 3 text tokens,
    drawn from seed `index`."""
    config = PRESETS["sana_wm_2.6b"].replace(num_layers=4)
    (frames, height, width), text_len = RELEASED_WIDTH_GRID, 3
    rng = np.random.default_rng(index)
    c = config.hidden_size
    x = jnp.asarray(rng.standard_normal((1, frames, height * width, c)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, text_len, c)), jnp.float32)
    text_mask = jnp.ones((1, text_len), jnp.int32)
    t_mod = jnp.asarray(rng.standard_normal((1, frames, 6 * c)) * 0.1, jnp.float32)
    conditions = jnp.asarray(camera_inputs(rng, 1, frames, height, width)[0])
    rays = jnp.asarray(rng.standard_normal((1, frames, height, width, config.chunk_plucker_channels)), jnp.float32)
    embed_kernel = rng.standard_normal((*config.patch_size, config.chunk_plucker_channels, c)) * 0.02
    plucker = LinearPatches(rays, jnp.asarray(embed_kernel, jnp.float32),
                            jnp.asarray(rng.standard_normal(c) * 0.1, jnp.float32))
    return config, rng, (x, text, text_mask, t_mod, conditions, plucker)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 3], ids=["gdn", "softmax"])
def test_released_width_block(index):
    """One block of the 2.6B config (hidden 2240, 20 heads of 112) on a 7-frame 2x2 grid."""
    config, rng, (x, text, text_mask, t_mod, conditions, plucker) = released_width_block_inputs(index)
    frames, height, width = RELEASED_WIDTH_GRID
    grid = RELEASED_WIDTH_GRID
    c = config.hidden_size
    rope = rotary_tables(grid, config.linear_head_dim, config.rope_max_seq_len)
    transforms = ucpe.ray_transforms(jnp.asarray(conditions), grid, config.patch_size, config.linear_head_dim,
                                     config.rope_max_seq_len)
    args = (text, text_mask, t_mod, rope, transforms, plucker, None)
    abstract = jax.eval_shape(lambda: SanaWMBlock(config, index, grid).init(jax.random.key(0), x, *args))["params"]
    params = random_params(abstract, rng)

    def run(mode, x):
        block = SanaWMBlock(config.replace(mode=mode, chunk_frames=3), index, grid)
        return jax.jit(block.apply)({"params": params}, x, *args)

    bidirectional = run("bidirectional", x)
    one_chunk = SanaWMBlock(config.replace(mode="chunk_causal", chunk_frames=7), index, grid)
    assert rel(jax.jit(one_chunk.apply)({"params": params}, x, *args), bidirectional) <= ONE_CHUNK_REL_TOL
    changed_x = x.at[:, 4:].set(jnp.asarray(rng.standard_normal((1, 3, height * width, c)), jnp.float32))
    causal, causal_changed = run("chunk_causal", x), run("chunk_causal", changed_x)
    assert rel(causal_changed[:, :4], causal[:, :4]) <= CAUSAL_REL_TOL
    assert rel(run("bidirectional", changed_x)[:, :4], bidirectional[:, :4]) > LEAK_MIN
