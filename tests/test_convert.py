"""The converter reads all three released layouts (written here by the tests), is strict about keys and shapes, and
its output restores through `load_transformer`."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import convert_torch_weights
from sanawm_jax import load_transformer
from sanawm_jax.checkpoint.keymap import ConversionError
from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.sana_wm.checkpoint import (
    convert_state_dict,
    flax_path,
    torch_key,
)
from sanawm_jax.models.sana_wm.config import SanaWMConfig


@pytest.fixture(scope="module")
def oracle_fp32(tiny_oracle):
    oracle, diffusers_config = tiny_oracle
    return copy.deepcopy(oracle).float(), diffusers_config


@pytest.fixture(scope="module")
def expected_params(oracle_fp32):
    oracle, diffusers_config = oracle_fp32
    config = SanaWMConfig.from_diffusers_config(diffusers_config)
    return convert_state_dict(TorchStateDictSource(oracle.state_dict(), "oracle"), config, log=lambda *_: None)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def write_diffusers_folder(oracle, folder):
    oracle.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file(), "expected a sharded folder"
    return folder


def write_nvlabs_file(oracle, path, hidden_size):
    state = {k: v.contiguous() for k, v in oracle.state_dict().items()}
    state["pos_embed"] = torch.zeros(1, 484, hidden_size)
    save_file(state, str(path))
    return path


def write_torch_pickle(oracle, path):
    torch.save({"generator": {f"model.{k}": v for k, v in oracle.state_dict().items()}, "step": 7}, path)
    return path


def test_weight_names_round_trip():
    for key, ndim in [
        ("blocks.3.attn.qkv.weight", 2),
        ("blocks.0.mlp.inverted_conv.conv.bias", 1),
        ("t_block.1.weight", 2),
        ("y_embedder.y_proj.fc2.weight", 2),
        ("attention_y_norm.weight", 1),
        ("blocks.1.attn.conv_k.weight", 3),
    ]:
        assert torch_key(flax_path(key, ndim)) == key


def test_diffusers_sharded_folder_round_trips(oracle_fp32, expected_params, tmp_path):
    oracle, _ = oracle_fp32
    root = tmp_path / "pipeline"
    write_diffusers_folder(oracle, root / "transformer")
    convert_torch_weights.main([str(root), str(tmp_path / "out")])  # config comes from transformer/config.json
    model, params = load_transformer(tmp_path / "out")
    assert model.config.num_layers == 4
    assert_trees_equal(params, expected_params)


def test_nvlabs_safetensors_round_trips(oracle_fp32, expected_params, tmp_path):
    oracle, diffusers_config = oracle_fp32
    path = write_nvlabs_file(oracle, tmp_path / "sana_wm.safetensors", diffusers_config["hidden_size"])
    (tmp_path / "tiny.json").write_text(json.dumps(diffusers_config))
    convert_torch_weights.main([str(path), str(tmp_path / "out"), "--config", str(tmp_path / "tiny.json")])
    _, params = load_transformer(tmp_path / "out")
    assert_trees_equal(params, expected_params)


def test_torch_pickle_round_trips(oracle_fp32, expected_params, tmp_path):
    oracle, _ = oracle_fp32
    path = write_torch_pickle(oracle, tmp_path / "model.pt")
    convert_torch_weights.main([str(path), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    _, params = load_transformer(tmp_path / "out")
    assert_trees_equal(params, expected_params)


def test_files_without_config_need_one(oracle_fp32, tmp_path):
    oracle, diffusers_config = oracle_fp32
    path = write_nvlabs_file(oracle, tmp_path / "w.safetensors", diffusers_config["hidden_size"])
    with pytest.raises(ValueError, match="carries no config.json"):
        convert_torch_weights.main([str(path), str(tmp_path / "out")])


def test_load_casts_to_requested_param_dtype(oracle_fp32, tmp_path):
    oracle, _ = oracle_fp32
    write_torch_pickle(oracle, tmp_path / "model.pt")
    convert_torch_weights.main([str(tmp_path / "model.pt"), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    model, params = load_transformer(tmp_path / "out", param_dtype="bfloat16", dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
    assert model.config.dtype == "bfloat16"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("blocks.2.attn.k_proj_cam.bias"), r"missing key.*\n.*blocks\.2\.attn\.k_proj_cam\.bias"),
        (lambda s: s.__setitem__("blocks.0.attn.extra.weight", torch.zeros(3, 3)), r"unexpected key.*\n.*blocks\.0\.attn\.extra\.weight"),
        (lambda s: s.__setitem__("final_layer.linear.weight", torch.zeros(5, 64)), r"shape mismatch.*\n.*final_layer\.linear\.weight"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_mismatched_checkpoint_names_the_key(oracle_fp32, tmp_path, edit, message):
    oracle, _ = oracle_fp32
    state = dict(oracle.state_dict())
    edit(state)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ConversionError, match=message):
        convert_torch_weights.main([str(tmp_path / "broken.pt"), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    assert not (tmp_path / "out").exists()


def test_load_places_params_with_the_requested_sharding(oracle_fp32, tmp_path):
    oracle, _ = oracle_fp32
    write_torch_pickle(oracle, tmp_path / "model.pt")
    convert_torch_weights.main([str(tmp_path / "model.pt"), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, params = load_transformer(tmp_path / "out", sharding=replicated)
    assert {leaf.sharding for leaf in jax.tree.leaves(params)} == {replicated}
