"""The sharding module: mesh construction and its `AXIS=N,...` spelling, logical-axis rules, parameter shardings from
path patterns; sharded forwards and a sharded training run on 8 simulated CPU devices equal single-device runs.

The sharded runs are checks in tests/multi_device.py: every multi-device check runs in one subprocess started with
fake CPU devices (the `multi_device` session fixtures), and the tests here assert on what it measured.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from jax.sharding import PartitionSpec

import train
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import abstract_params
from sanawm_jax.parallel import (
    FSDP,
    TENSOR,
    axis_rules,
    batch_spec,
    format_mesh,
    fsdp_partition,
    logical_to_spec,
    make_mesh,
    mesh_sizes,
    parse_mesh,
)
from sanawm_jax.parallel.shardings import param_spec, path_string
from sanawm_jax.training.metrics import read_metrics
from tests.multi_device import TRAIN_MESHES, TRAIN_STEPS
from tests.test_train_cli import train_args

MESH_8 = {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}


def test_parse_mesh_and_format_round_trip():
    assert parse_mesh("fsdp=2,context=4") == {"fsdp": 2, "context": 4}
    assert mesh_sizes(parse_mesh("tensor=2")) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 2}
    assert format_mesh(parse_mesh(" context=4 , fsdp=2")) == "fsdp=2,context=4"


@pytest.mark.parametrize("text, message", [
    ("fsdp", "mesh must be AXIS=N"),
    ("fsdp=two", "mesh must be AXIS=N"),
    ("pipeline=2", "unknown mesh axis 'pipeline'"),
    ("fsdp=0", "mesh axis fsdp must have a positive integer size"),
    ("fsdp=2,fsdp=2", "given twice"),
])
def test_parse_mesh_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


def test_mesh_size_must_match_the_devices():
    with pytest.raises(ValueError, match=r"mesh fsdp=2,context=2 needs 4 devices, have 1"):
        make_mesh({"fsdp": 2, "context": 2})
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}


def test_train_cli_mesh_errors_are_one_line(tmp_path, capsys):
    for flags, expected in [
        (["--mesh", "fsdp=x"], "error: argument --mesh: mesh must be AXIS=N,... (e.g. fsdp=2,context=4), got 'fsdp=x'"),
        (["--mesh", "fsdp=2,tensor=4"], "error: mesh fsdp=2,tensor=4 needs 8 devices, have 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.cli.run(train.main, ["--workdir", str(tmp_path / "run"), *flags])
        assert (exit_info.value.code, capsys.readouterr().err.splitlines()) == (2, [expected])
    assert not (tmp_path / "run").exists()


def test_rules_take_the_mesh_axes_that_divide_the_dimension():
    # A batch of 4 splits over data x fsdp, 2 over data only, 1 not at all; axes of size 1 are left out.
    mesh = {"data": 2, "fsdp": 4}
    assert logical_to_spec(("batch",), (4 * 2,), mesh) == PartitionSpec(("data", "fsdp"))
    assert logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
    assert logical_to_spec(("batch",), (1,), mesh) == PartitionSpec(None)
    # A mesh axis serves one dimension only: heads take tensor before the MLP dimension can.
    assert logical_to_spec(("act_heads", "act_mlp"), (4, 4), {"tensor": 2}) == PartitionSpec(TENSOR, None)
    with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
        logical_to_spec(("nope",), (2,), mesh)


def test_a_different_layout_is_a_different_rules_table():
    with axis_rules({"batch": ("data", "fsdp"), "act_mlp": ("fsdp",)}):
        assert logical_to_spec(("batch", "act_mlp"), (1, 8), {"fsdp": 4}) == PartitionSpec(None, FSDP)
    assert logical_to_spec(("batch", "act_mlp"), (1, 8), {"fsdp": 4}) == PartitionSpec(None, None)


def test_parameter_shardings_of_the_2_6b_model():
    specs = {}
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(PRESETS["sana_wm_2.6b"]))[0]:
        specs[path_string(path)] = param_spec(path_string(path), leaf.shape, MESH_8)
    block = "blocks_3/"
    # Row-parallel output projections: input channels (heads) over tensor, output channels over fsdp.
    assert specs[block + "attn/proj/kernel"] == PartitionSpec(TENSOR, FSDP)
    assert specs[block + "mlp/point_conv/kernel"] == PartitionSpec(None, None, TENSOR, FSDP)
    # Column-parallel camera projections; the fused qkv is split over fsdp only (regrouped per head in the model).
    assert specs[block + "attn/q_proj_cam/kernel"] == PartitionSpec(FSDP, TENSOR)
    assert specs[block + "attn/qkv/kernel"] == PartitionSpec(FSDP, None)
    # Parameters no pattern names: FSDP on the largest divisible dimension, or replicated when small.
    assert specs["t_block/kernel"] == PartitionSpec(None, FSDP)
    assert specs[block + "attn/A_log"] == PartitionSpec()
    # Optimiser-state leaves repeat the parameter paths and take the same layout.
    assert param_spec("1/0/mu/" + block + "attn/proj/kernel", (2240, 2240), MESH_8) == PartitionSpec(TENSOR, FSDP)


def test_fsdp_partition_splits_the_largest_divisible_axis():
    assert fsdp_partition((2240, 6720), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((6, 2240), 4, 16) == PartitionSpec(None, FSDP)
    assert fsdp_partition((2240,), 4, 2**14) == PartitionSpec()  # small: replicated
    assert fsdp_partition((3, 5, 7), 4, 1) == PartitionSpec()  # indivisible: replicated


def test_batch_spec_on_a_one_device_mesh_is_unsplit():
    assert batch_spec((3, 5), make_mesh()) == PartitionSpec(None)


def test_sharded_forward_equals_single_device(multi_device):
    result = multi_device("sharded_forward")
    assert result["restored_split_params"] > 0, "no parameter was sharded"
    assert result["restored_shards"] == [8]
    fsdp8, hybrid = result["fsdp=8"], result["data=2,fsdp=2,tensor=2"]
    assert fsdp8["output_batch_spec"] == "None"  # batch 1 on 8 devices: not split
    assert hybrid["output_batch_spec"] == "('data', 'fsdp')"
    assert hybrid["proj_spec"] == ["tensor", "fsdp"] and hybrid["point_conv_spec"] == ["None", "None", "tensor", "fsdp"]
    # Same float32 program; only the reduction order of the sharded matmuls differs: round-off, 1e-5.
    for name in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
        assert result[name]["relative_l2"] < 1e-5, (name, result[name]["relative_l2"])


@pytest.mark.slow
def test_batch_1_training_on_meshes_equals_one_device(multi_device_slow, demo_train_data, tmp_path):
    """The embedded train.py default, 4 steps of batch 1, on --mesh fsdp=8 (batch kept whole) and on
    --mesh fsdp=2,context=2,tensor=2 (3 latent frames padded to 4 over context 2, heads and MLP over tensor) against
    one device, from metrics.jsonl."""
    sharded = multi_device_slow("train_on_meshes")
    train.main(train_args(demo_train_data, tmp_path, "--steps", str(TRAIN_STEPS)))
    single = [record["loss"] for record in read_metrics(tmp_path)]
    assert len(single) == TRAIN_STEPS
    for mesh in TRAIN_MESHES:
        assert sharded[mesh]["recorded_mesh"] == mesh and sharded[mesh]["latent_frames"] == 3
        # Same float32 steps; the sharded gradients sum in another order and the context-parallel layers exchange
        # frames: round-off (measured 3e-7 relative), amplified a little by 4 Adam steps, far under 1e-4.
        np.testing.assert_allclose(sharded[mesh]["losses"], single, rtol=1e-4, err_msg=mesh)


@pytest.mark.slow
def test_sharded_2_6b_block_equals_single_device(multi_device_slow):
    result = multi_device_slow("sharded_forward_2_6b_block")
    for kind in ("gdn", "softmax"):
        for name in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
            # float32, 2240-wide reductions in another order: round-off, 1e-5.
            assert result[kind][name]["relative_l2"] < 1e-5, (kind, name, result[kind][name])


def train_processes(workdir, data, num_processes: int, devices: int, steps: int, cache) -> None:
    """train.py on the embedded default data over `num_processes` processes of `devices` fake CPU devices each
    (--mesh fsdp=8, a global batch of 2), until `steps`; fails with the processes' stderr if one fails."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    args = train_args(data, workdir, "--steps", str(steps), "--mesh", "fsdp=8", "--batch-size", "2",
                      "--checkpoint-every", "2")
    args = [a for a in args if a != "--no-compilation-cache"] + ["--compilation-cache", str(cache)]
    multi = lambda i: ["--coordinator", f"localhost:{port}", "--num-processes", str(num_processes),
                       "--process-id", str(i)]
    processes = [subprocess.Popen([sys.executable, train.__file__, *args, *multi(i)], env=env, stderr=subprocess.PIPE,
                                  text=True) for i in range(num_processes)]
    errors = [process.communicate(timeout=900)[1] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(e[-2000:] for e in errors)


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume(demo_train_data, tmp_path):
    """2 processes x 4 devices (each loading 1 example of the global batch of 2, checkpointing collectively) give the
    losses of one device training on the same global batches (in this process), and a second 2-process run resumes
    from their step-2 checkpoint with the losses of the uninterrupted run."""
    train.main(train_args(demo_train_data, tmp_path / "one", "--steps", "4", "--batch-size", "2"))
    train_processes(tmp_path / "two", demo_train_data, 2, 4, 2, tmp_path / "cache")
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2]
    train_processes(tmp_path / "two", demo_train_data, 2, 4, 4, tmp_path / "cache")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2, 4]
    # The same global batches and float32 steps; the sharded gradients sum in another order, partly over gloo:
    # round-off (measured 6e-8 relative against one process of 8 devices, 3e-7 for one device against meshes in
    # test_batch_1_training_on_meshes_equals_one_device), amplified a little by 4 Adam steps, far under 1e-4.
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


def test_runs_over_several_cpu_processes_skip_the_compilation_cache(tmp_path, monkeypatch):
    """Only process 0 would find its CPU programs in the cache (entries are keyed per process and process 0 writes
    them): it would reach each collective while the others still compile."""
    import jax

    from sanawm_jax import cli

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    args = SimpleNamespace(no_compilation_cache=False, compilation_cache=str(tmp_path / "cache"))
    assert cli.apply_compilation_cache_flags(args) is None
    assert not (tmp_path / "cache").exists()


def test_recipe_fields_are_flags_and_the_command_line_overrides_them(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"mesh": "fsdp=2,context=2", "batch_size": 4, "remat": true, "lr": 2e-5}')
    args = train.parse_args(["--workdir", str(tmp_path), "--recipe", str(recipe), "--batch-size", "2"])
    assert (args.mesh, args.batch_size, args.remat, args.lr) == ("fsdp=2,context=2", 2, True, 2e-5)
    assert args.resolved_recipe["batch_size"] == 2 and "workdir" not in args.resolved_recipe
    recipe.write_text('{"workdir": "elsewhere"}')
    with pytest.raises(ValueError, match="not settable field 'workdir'"):
        train.parse_args(["--workdir", str(tmp_path), "--recipe", str(recipe)])


@pytest.mark.parametrize("name", ["tiny_demo.json", "sana_wm_stage1_chunk_causal_720p.json"])
def test_shipped_recipes_parse(name, tmp_path):
    from pathlib import Path

    path = Path(train.__file__).parent / "configs" / "train" / name
    args = train.parse_args(["--workdir", str(tmp_path), "--recipe", str(path)])
    assert args.resolved_recipe["config"] in ("tiny", "2.6b")
    if name.startswith("sana_wm_stage1"):
        # Upstream's stage-1 teacher: chunk-causal, CP 2 on top of FSDP over 8 GPUs, chunk-timestep mixture, bf16.
        assert (args.mode, args.mesh, args.timestep_sampling, args.dtype) == (
            "chunk_causal", "fsdp=4,context=2", "chunk_mixture", "bfloat16")
