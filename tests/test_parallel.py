"""Sharded execution on a ("data", "fsdp") mesh of 4 simulated CPU devices equals single-device execution.

The device count is fixed when JAX starts, so the sharded runs happen in a subprocess started with
`--xla_force_host_platform_device_count=4`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec

from sanawm_jax.parallel import FSDP, fsdp_partition, make_mesh

SHARDED_RUN = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from sanawm_jax import load_transformer, save_transformer
    from sanawm_jax.models.sana_wm.config import PRESETS
    from sanawm_jax.parallel import batch_sharding, fsdp_shardings, make_mesh
    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs, init_params

    assert jax.device_count() == 4
    config = PRESETS["sana_wm_tiny"].replace(hidden_size=128, linear_head_dim=32, num_attention_heads=4)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
              for k, v in example_inputs(config, batch=4, frames=3, height=2, width=3, text_len=5).items()}
    inputs["timesteps"] = jnp.asarray(rng.uniform(0, 1000, (4, 3)), jnp.float32)
    inputs["text_mask"] = jnp.ones((4, 5), jnp.int32)
    inputs["camera_conditions"] = example_inputs(config, batch=4, frames=3)["camera_conditions"]
    inputs["camera_conditions"] = inputs["camera_conditions"].at[..., 16:].set(jnp.array([3.0, 2.0, 1.5, 1.0]))
    apply = jax.jit(SanaWMTransformer(config).apply)
    expected = np.asarray(apply({"params": params}, **inputs))

    mesh = make_mesh(data=2, fsdp=2)
    shardings = fsdp_shardings(abstract_params(config), mesh)
    save_transformer("{ckpt}", params, config)
    _, sharded = load_transformer("{ckpt}", sharding=shardings)
    split = [leaf for leaf in jax.tree.leaves(sharded) if not leaf.sharding.is_fully_replicated]
    assert split, "no parameter was sharded"
    assert all(len(leaf.addressable_shards) == 4 for leaf in split)
    batch = jax.device_put(inputs, batch_sharding(mesh))
    out = apply({"params": sharded}, **batch)
    assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding
    error = np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected)
    assert error < 1e-5, error
    print("sharded", len(split), "of", len(jax.tree.leaves(sharded)), "params; relative L2", error)
    """
)


def test_fsdp_partition_splits_the_largest_divisible_axis():
    assert fsdp_partition((2240, 6720), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((6, 2240), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((2240,), 4, 2**14) == PartitionSpec()  # small: replicated
    assert fsdp_partition((3, 5, 7), 4, 1) == PartitionSpec()  # indivisible: replicated


def test_mesh_size_must_match_the_devices():
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2)


def test_sharded_forward_equals_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = SHARDED_RUN.replace("{ckpt}", str(tmp_path / "ckpt"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "relative L2" in run.stdout
