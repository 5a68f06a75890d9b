"""Context parallelism: the frames of a clip sharded over a "context" mesh axis give the single-device results.

The sharded runs are checks in tests/multi_device.py (one subprocess with fake CPU devices per test tier); the tests
here assert on what they measured. Every comparison is float32 against the same float32 single-device program: the
sharded programs only change summation orders (state chaining, online softmax, padded keys that add exact zeros), so
errors are round-off, bounded at 1e-5 relative.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sanawm_jax.models.sana_wm.chunks import chunk_starts, later_chunk_ahead, same_chunk_ahead
from sanawm_jax.ops.context_parallel import ContextLayout, context_layout

ROUND_OFF = 1e-5


def test_frames_pad_to_a_multiple_of_the_context_size():
    layout = ContextLayout(size=8, frames=121)
    assert (layout.padded_frames, layout.local_frames) == (128, 16)
    assert layout.valid_frames().sum() == 121
    assert ContextLayout(size=4, frames=6).padded_frames == 8
    assert ContextLayout(size=2, frames=6).padded_frames == 6


def test_block_frame_index_holds_each_devices_frames_with_halos():
    index = ContextLayout(size=4, frames=7).block_frame_index(reach=3, batch=2)
    assert index.shape == (8, 8)  # (devices x batch, 2 local frames + 2 x 3 halo frames)
    assert index[0].tolist() == [-3, -2, -1, 0, 1, 2, 3, 4]
    assert index[1].tolist() == index[0].tolist()  # the second sample of device 0
    assert index[6].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]


def test_no_mesh_or_a_context_axis_of_one_keeps_the_single_device_path():
    assert context_layout(7) is None
    with jax.set_mesh(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("context",))):
        assert context_layout(7) is None
    with pytest.raises(ValueError, match="context_impl"):
        context_layout(7, "gather")


def test_chunk_masks_at_frame_positions_match_the_whole_clip():
    starts = chunk_starts(13, 3)
    index = np.arange(-3, 16)
    inside = (index >= 0) & (index < 13)
    for offset in (1, 2, 3):
        at_positions = same_chunk_ahead(starts, 13, offset, index)
        assert at_positions[inside].tolist() == same_chunk_ahead(starts, 13, offset).tolist()
        assert not at_positions[~inside].any()
        later = later_chunk_ahead(starts, 13, offset, index)
        assert later[index == 3].item() == (offset >= 1)  # frame 3 closes the first chunk
        assert not (later * at_positions).any()


def test_sharded_ops_equal_single_device_ops(multi_device):
    errors = multi_device("context_parallel_ops")
    assert len(errors) == 13, errors
    assert max(errors.values()) < ROUND_OFF, errors


def test_bf16_gradients_compile_and_match_float32(multi_device):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per value); inputs, products and the sums over keys
    and devices each round, so the gradients sit a few 1e-3 from the float32 ones; 3e-2 allows for that and still
    fails on a wrong sum (e.g. a gradient counted once per device, an error of order 1)."""
    errors = multi_device("context_parallel_bf16_gradients")
    assert sorted(errors) == ["cross-attention", "softmax allgather"]
    assert max(errors.values()) < 3e-2, errors


def test_sharded_forward_equals_single_device_forward(multi_device):
    errors = multi_device("context_parallel_forward")
    assert list(errors) == ["ctx=4 allgather chunk_causal"]
    assert max(errors.values()) < ROUND_OFF, errors


def test_context_parallel_program_lowers_without_partition_ids(multi_device):
    """The mesh_memory kind of program (bf16 forward from sharded abstract operands, 4 tiny blocks, fsdp=2,context=4)
    must hold no partition id: XLA's SPMD partitioner rejects one inside a shard_map with automatic axes."""
    result = multi_device("context_parallel_lowering")
    assert result["manual_computations"] >= 4, result  # the context-parallel layers are there, as shard_maps
    assert result["partition_ids"] == 0, result


@pytest.mark.slow
def test_context_parallel_program_compiles(multi_device_slow):
    """The program of the test above, with 8 blocks, compiles (it failed with "PartitionId instruction is not
    supported for SPMD partitioning" while the ops read their device index with lax.axis_index)."""
    assert multi_device_slow("context_parallel_compile")["temp_bytes"] > 0


@pytest.mark.slow
def test_every_context_size_impl_and_mode_equals_single_device(multi_device_slow):
    errors = multi_device_slow("context_parallel_forward_all")
    assert len(errors) == 5 + 2 * 2 + 1, sorted(errors)
    assert max(errors.values()) < ROUND_OFF, errors


@pytest.mark.slow
def test_sampled_latents_equal_single_device(multi_device_slow):
    """`sample.py --num-frames 41 --mesh fsdp=2,context=4`: the whole sampler (4 flow steps with CFG) on the demo;
    round-off grows through the steps, hence 1e-4."""
    result = multi_device_slow("context_parallel_sample")
    assert result["shape"][0] == 6
    assert result["allgather"] < 1e-4 and result["ulysses"] < 1e-4, result
