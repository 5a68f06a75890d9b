"""The streaming mode of the DiT (`SanaWMConfig.mode = "streaming"`, `stream_state=`): one block of latent frames
at a time with carried GDN states, short-conv and FFN frames and a softmax key/value window.

Invariant, in float32: run block by block with a window covering the whole clip, the streaming model equals the
chunk-causal model on the same inputs. The same float32 operations up to summation order (masked cache slots add
exact zeros), except that the chunk-causal FFN removes its taps into a later chunk by subtraction: bound 1e-5
relative, as tests/test_chunk_causal.py. Checked on a tiny model (one block of each kind) and on one block
of each kind at the released 2.6B widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanawm_jax.demo import random_params
from sanawm_jax.models.sana_wm import streaming, ucpe
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.layers import rotary_tables
from sanawm_jax.models.sana_wm.streaming import block_bounds, init_stream_state
from sanawm_jax.models.sana_wm.transformer import SanaWMBlock, SanaWMTransformer, abstract_params
from tests.test_chunk_causal import RELEASED_WIDTH_GRID, model_inputs, rel, released_width_block_inputs

STREAM_REL_TOL = 1e-5
# The tiny preset cut to one block of each kind (GDN, softmax): half the compilation of the 4-block preset.
TINY = PRESETS["sana_wm_tiny"].replace(num_layers=2, softmax_every_n=2, chunk_plucker_post_attn_blocks=2)


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(abstract_params(TINY), np.random.default_rng(0))
PER_FRAME = ("latents", "timesteps", "camera_conditions", "chunk_plucker")


def run_blocks(config, params, inputs, frames):
    """The streaming model over every block of `inputs`; returns (concatenated output, compiled program count)."""
    step = jax.jit(SanaWMTransformer(config).apply)
    state = init_stream_state(config, 1, *inputs["latents"].shape[2:4])
    outputs = []
    for start, end in block_bounds(config, frames):
        block = {k: (v[:, start:end] if k in PER_FRAME else v) for k, v in inputs.items()}
        output, state = step({"params": params}, **block, stream_state=state)
        outputs.append(output)
    assert int(state.block) == len(outputs) and int(state.start_frame) == frames
    return jnp.concatenate(outputs, axis=1), step._cache_size()


def test_streaming_equals_chunk_causal(tiny_params, gdn_impl="xla", num_cached_blocks=2):
    """10 frames = blocks of 4, 3, 3: with one ring slot the window holds every earlier block. (The Pallas kernel
    with carried state equals the XLA op: tests/test_gdn_state.py.)"""
    frames = 10
    inputs = model_inputs(TINY, frames, seed=1)
    reference = jax.jit(SanaWMTransformer(TINY.replace(mode="chunk_causal")).apply)({"params": tiny_params}, **inputs)
    config = TINY.replace(mode="streaming", gdn_impl=gdn_impl, num_cached_blocks=num_cached_blocks)
    output, programs = run_blocks(config, tiny_params, inputs, frames)
    assert rel(output, reference) <= STREAM_REL_TOL
    assert programs == 2  # block 0, and one program for every later block


def test_window_keeps_sink_and_recent_blocks():
    """Which blocks' keys block c attends to, against upstream's rule with sink_token on
    (`SelfForcingFlowEulerCamCtrl._accumulate_softmax_kv_cache`): c >= num_cached_blocks sees block 0 and the
    num_cached_blocks - 1 blocks before c; earlier blocks see every block before them."""
    expected = {  # num_cached_blocks -> block -> attended earlier blocks
        2: {0: [], 1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 3], 5: [0, 4]},
        3: {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 2, 3], 5: [0, 3, 4], 6: [0, 4, 5]},
        1: {0: [], 1: [0], 2: [0], 3: [0]},
    }
    tokens = 2
    for num_cached, attended in expected.items():
        config = TINY.replace(mode="streaming", num_cached_blocks=num_cached)
        sink, per_slot, slots = streaming.cache_tokens(config, tokens)
        cache = jnp.full((1, sink + slots * per_slot, 1, 1), -1.0)
        for block in sorted(attended):
            mask = np.asarray(streaming.cached_key_mask(config, tokens, jnp.int32(block)))
            assert sorted(set(np.asarray(cache)[0, mask, 0, 0].astype(int).tolist())) == attended[block]
            frames = streaming.block_frames(config, block)
            marker = jnp.full((1, frames * tokens, 1, 1), float(block))
            cache = streaming.write_block(config, cache, marker, jnp.int32(block), first=block == 0)


def test_block_layout_and_errors(tiny_params):
    config = TINY.replace(mode="streaming")
    assert block_bounds(config, 10) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="chunk_frames \\* k \\+ 1"):
        block_bounds(config, 9)
    with pytest.raises(ValueError, match="mode 'streaming'"):
        init_stream_state(TINY, 1, 2, 3)
    inputs = model_inputs(TINY, 5, seed=0)
    state = init_stream_state(config, 1, 2, 3)
    with pytest.raises(ValueError, match="needs a model in mode 'streaming'"):
        SanaWMTransformer(TINY.replace(mode="chunk_causal")).apply({"params": tiny_params}, **inputs, stream_state=state)
    with pytest.raises(ValueError, match="got 5"):
        SanaWMTransformer(config).apply({"params": tiny_params}, **inputs, stream_state=state)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 3], ids=["gdn", "softmax"])
def test_released_width_block(index):
    """One block of the 2.6B config (hidden 2240, 20 heads of 112) on a 7-frame 2x2 grid: blocks of 4 and 3 frames
    with carried caches equal the chunk-causal block."""
    config, rng, (x, text, text_mask, t_mod, conditions, plucker) = released_width_block_inputs(index)
    frames, height, width = RELEASED_WIDTH_GRID

    def geometry(start, end):
        grid = (end - start, height, width)
        rope = rotary_tables(grid, config.linear_head_dim, config.rope_max_seq_len, start_frame=jnp.int32(start))
        transforms = ucpe.ray_transforms(conditions[:, start:end], grid, config.patch_size, config.linear_head_dim,
                                         config.rope_max_seq_len, jnp.int32(start))
        return rope, transforms

    rope, transforms = geometry(0, frames)
    causal = SanaWMBlock(config.replace(mode="chunk_causal"), index, (frames, height, width))
    args = (text, text_mask, t_mod, rope, transforms, plucker, None)
    params = random_params(jax.eval_shape(lambda: causal.init(jax.random.key(0), x, *args))["params"], rng)
    reference = jax.jit(causal.apply)({"params": params}, x, *args)

    stream_config = config.replace(mode="streaming")
    layer_cache = init_stream_state(stream_config, 1, height, width).layers[index]
    outputs = []
    for block, (start, end) in enumerate(block_bounds(stream_config, frames)):
        rope, transforms = geometry(start, end)
        piece = lambda a: a[:, start:end]
        module = SanaWMBlock(stream_config, index, (end - start, height, width))
        output, layer_cache = jax.jit(module.apply)(
            {"params": params}, piece(x), text, text_mask, piece(t_mod), rope, transforms,
            plucker._replace(inputs=piece(plucker.inputs)), None, layer_cache, jnp.int32(block),
        )
        outputs.append(output)
    assert rel(jnp.concatenate(outputs, axis=1), reference) <= STREAM_REL_TOL
