"""Lazy PyTorch checkpoint readers: each layout round-trips exactly, bad inputs fail naming the file."""

import json
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sanawm_jax.checkpoint.torch_sources import open_torch_checkpoint

CONFIG = {"_class_name": "SanaWMTransformer3DModel", "num_layers": 2, "hidden_size": 8}


def make_state():
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.A_log": torch.randn(4, generator=g),
        "blocks.0.attn.conv_k.weight": torch.randn(8, 1, 4, generator=g),
        "blocks.1.mlp.weight": torch.randn(6, 8, generator=g).bfloat16(),
        "x_embedder.proj.weight": torch.randn(8, 3, 1, 1, 1, generator=g),
        "pos_embed": torch.randn(1, 5, 8, generator=g),
        "scale_shift_table": torch.randn(2, 8, generator=g).half(),
        "counter": torch.tensor(7, dtype=torch.int64),
    }


def assert_matches(source, state):
    assert source.keys() == sorted(state)
    for key, tensor in state.items():
        assert source.shape(key) == tuple(tensor.shape)
        assert source.dtype_name(key) == {
            torch.float32: "F32",
            torch.bfloat16: "BF16",
            torch.float16: "F16",
            torch.int64: "I64",
        }[tensor.dtype]
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        loaded = source.load(key)
        assert loaded.dtype == expected.dtype
        np.testing.assert_array_equal(loaded, expected)


def write_diffusers_folder(folder, state, shards=1):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def test_flat_safetensors_round_trip_keeps_pos_embed(tmp_path):
    state = make_state()
    save_file(state, tmp_path / "dit.safetensors")
    source = open_torch_checkpoint(tmp_path / "dit.safetensors")
    assert_matches(source, state)
    assert "pos_embed" in source.keys()
    assert source.config is None
    assert str(tmp_path / "dit.safetensors") in source.description


def test_diffusers_folder_single_file(tmp_path):
    state = make_state()
    write_diffusers_folder(tmp_path / "transformer", state)
    source = open_torch_checkpoint(tmp_path / "transformer")
    assert_matches(source, state)
    assert source.config == CONFIG


def test_diffusers_folder_sharded(tmp_path):
    state = make_state()
    write_diffusers_folder(tmp_path / "model", state, shards=3)
    source = open_torch_checkpoint(tmp_path / "model")
    assert_matches(source, state)
    assert source.config == CONFIG
    assert "3 shards" in source.description


def test_pipeline_root_with_transformer_subfolder(tmp_path):
    state = make_state()
    write_diffusers_folder(tmp_path / "transformer", state, shards=2)
    (tmp_path / "model_index.json").write_text("{}")
    write_diffusers_folder(tmp_path / "vae", {"decoder.conv.weight": torch.ones(2, 2)})
    assert_matches(open_torch_checkpoint(tmp_path), state)
    assert_matches(open_torch_checkpoint(tmp_path, subfolder="transformer"), state)
    assert open_torch_checkpoint(tmp_path, subfolder="vae").keys() == ["decoder.conv.weight"]


@pytest.mark.parametrize(
    "wrap, suffix",
    [
        (lambda sd: {"generator": {f"model.{k}": v for k, v in sd.items()}, "step": 3}, ".pt"),
        (lambda sd: {"state_dict": sd, "epoch": 1}, ".pth"),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, ".pt"),
        (lambda sd: {**sd, "step": 3}, ".bin"),
        (lambda sd: {f"module.model.{k}": v for k, v in sd.items()}, ".pt"),
    ],
    ids=["generator-model-prefix", "state_dict", "model-module-prefix", "bare", "bare-module-model-prefix"],
)
def test_torch_pickle_round_trip(tmp_path, wrap, suffix):
    state = make_state()
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(state), path)
    assert_matches(open_torch_checkpoint(path), state)


def test_torch_pickle_legacy_format(tmp_path):
    state = make_state()
    path = tmp_path / "old.pt"
    torch.save({"generator": state}, path, _use_new_zipfile_serialization=False)
    assert_matches(open_torch_checkpoint(path), state)


def test_torch_pickle_non_tensor_inside_state_dict_is_an_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"generator": {"a": torch.ones(2), "step": 3}}, path)
    with pytest.raises(ValueError, match="ckpt.pt.*non-tensor"):
        open_torch_checkpoint(path)


def test_torch_pickle_without_torch_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    torch.save({"a": torch.ones(2)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        open_torch_checkpoint(path)


def test_missing_shard_is_named(tmp_path):
    write_diffusers_folder(tmp_path / "model", make_state(), shards=2)
    (tmp_path / "model" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model-00002-of-00002.safetensors"):
        open_torch_checkpoint(tmp_path / "model")


def test_unrecognised_folder_and_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="empty.*expected a diffusers model folder"):
        open_torch_checkpoint(tmp_path / "empty")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.npz.*unrecognised"):
        open_torch_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        open_torch_checkpoint(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) - 10],
        lambda data: data[:20],
        lambda data: data[:8] + b"\xff" * (len(data) - 8),
        lambda data: data[:5],
    ],
    ids=["truncated-data", "truncated-header", "garbage-header", "too-short"],
)
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    save_file(make_state(), tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(damage((tmp_path / "good.safetensors").read_bytes()))
    with pytest.raises(ValueError, match="bad.safetensors"):
        open_torch_checkpoint(tmp_path / "bad.safetensors")


def test_unknown_key_is_a_key_error(tmp_path):
    save_file(make_state(), tmp_path / "dit.safetensors")
    with pytest.raises(KeyError, match="nope"):
        open_torch_checkpoint(tmp_path / "dit.safetensors").load("nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_reads_only_the_requested_tensor(tmp_path, dtype):
    numel = 1 << 20
    state = {f"t{i:02d}": torch.full((numel,), float(i), dtype=dtype) for i in range(64 // dtype.itemsize)}
    save_file(state, tmp_path / "big.safetensors")
    source = open_torch_checkpoint(tmp_path / "big.safetensors")
    out_bytes = numel * 4
    tracemalloc.start()
    try:
        loaded = source.load("t05")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded.dtype == np.float32 and loaded.shape == (numel,)
    assert np.all(loaded == 5.0)
    assert out_bytes <= peak < 2 * out_bytes


def test_sources_record_what_was_opened(tmp_path):
    save_file(make_state(), tmp_path / "dit.safetensors")
    write_diffusers_folder(tmp_path / "transformer", make_state())
    torch.save({"generator": make_state(), "critic": {"w": torch.ones(1)}, "step": 3}, tmp_path / "model.pt")
    assert open_torch_checkpoint(tmp_path / "dit.safetensors").path == tmp_path / "dit.safetensors"
    assert open_torch_checkpoint(tmp_path).path == tmp_path / "transformer"
    pickle = open_torch_checkpoint(tmp_path / "model.pt")
    assert (pickle.path, pickle.top_level) == (tmp_path / "model.pt", ("critic", "generator", "step"))


def test_folder_of_another_kind_names_its_config_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"]}))
    save_file(make_state(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="config.json describes Gemma2ForCausalLM and there are no diffusers weights"):
        open_torch_checkpoint(tmp_path)
