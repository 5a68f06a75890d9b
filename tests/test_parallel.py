"""Sharded execution on a ("data", "fsdp") mesh of 4 simulated CPU devices equals single-device execution.

The sharded run is a check in tests/multi_device.py: every multi-device check runs in one subprocess started with fake
CPU devices (the `multi_device` session fixture), and the tests here assert on what it measured.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec

from sanawm_jax.parallel import FSDP, fsdp_partition, make_mesh
from tests.multi_device import DEVICE_COUNT


def test_fsdp_partition_splits_the_largest_divisible_axis():
    assert fsdp_partition((2240, 6720), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((6, 2240), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((2240,), 4, 2**14) == PartitionSpec()  # small: replicated
    assert fsdp_partition((3, 5, 7), 4, 1) == PartitionSpec()  # indivisible: replicated


def test_mesh_size_must_match_the_devices():
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2)


def test_sharded_forward_equals_single_device(multi_device):
    result = multi_device("sharded_forward")
    assert result["split_params"] > 0, "no parameter was sharded"
    assert result["shards_per_split_param"] == [DEVICE_COUNT]
    assert result["output_batch_axes"] == ["data", "fsdp"]
    assert result["output_shape"] == result["expected_shape"]
    # Same float32 program; only the reduction order of the sharded matmuls differs: round-off, 1e-5.
    assert result["relative_l2"] < 1e-5, result["relative_l2"]
