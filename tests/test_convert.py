"""The converter reads the released layouts (written here by the tests), is strict about keys and shapes, refuses
released checkpoints of other models by name, fails as one line with exit code 2 leaving no output behind, and its
output restores through `load_transformer`, which names the first parameter of a checkpoint of another config."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import chex
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import convert_torch_weights
from sanawm_jax import abstract_params, cli, load_transformer
from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.keymap import ConversionError, flatten
from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.sana_wm.checkpoint import convert_state_dict
from sanawm_jax.models.sana_wm.config import PRESETS, SanaWMConfig


@pytest.fixture(scope="module")
def oracle_fp32(tiny_oracle):
    oracle, diffusers_config = tiny_oracle
    return copy.deepcopy(oracle).float(), diffusers_config


@pytest.fixture(scope="module")
def expected_params(oracle_fp32):
    oracle, diffusers_config = oracle_fp32
    config = SanaWMConfig.from_diffusers_config(diffusers_config)
    return convert_state_dict(TorchStateDictSource(oracle.state_dict(), "oracle"), config, log=lambda *_: None)


def write_diffusers_folder(oracle, folder):
    oracle.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file(), "expected a sharded folder"
    return folder


def write_flat_file(oracle, path):
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    return path


def write_torch_pickle(oracle, path):
    """A stage-1 trainer's pickle: nothing in it tells the kind, so it converts as bidirectional."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in oracle.state_dict().items()}, "step": 7}, path)
    return path


@pytest.fixture(scope="module")
def converted_pickle(oracle_fp32, tmp_path_factory):
    """The oracle, saved as a torch pickle and converted with the tiny preset; tests that edit it work on a copy."""
    oracle, _ = oracle_fp32
    folder = tmp_path_factory.mktemp("converted")
    write_torch_pickle(oracle, folder / "model.pt")
    convert_torch_weights.main([str(folder / "model.pt"), str(folder / "ckpt"), "--config", "sana_wm_tiny"])
    return folder / "ckpt"


def test_diffusers_sharded_folder_round_trips(oracle_fp32, expected_params, tmp_path):
    oracle, _ = oracle_fp32
    root = tmp_path / "pipeline"
    write_diffusers_folder(oracle, root / "transformer")
    convert_torch_weights.main([str(root), str(tmp_path / "out")])  # config comes from transformer/config.json
    model, params = load_transformer(tmp_path / "out")
    assert model.config.num_layers == 4
    chex.assert_trees_all_equal(params, expected_params)


def test_flat_safetensors_with_diffusers_names_round_trips(oracle_fp32, expected_params, tmp_path):
    oracle, diffusers_config = oracle_fp32
    path = write_flat_file(oracle, tmp_path / "sana_wm.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps(diffusers_config))
    convert_torch_weights.main([str(path), str(tmp_path / "out"), "--config", str(tmp_path / "tiny.json")])
    _, params = load_transformer(tmp_path / "out")
    chex.assert_trees_all_equal(params, expected_params)


def test_torch_pickle_round_trips(converted_pickle, expected_params):
    _, params = load_transformer(converted_pickle)
    chex.assert_trees_all_equal(params, expected_params)


def test_files_without_config_need_one(oracle_fp32, tmp_path):
    oracle, _ = oracle_fp32
    path = write_flat_file(oracle, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="carries no config.json"):
        convert_torch_weights.main([str(path), str(tmp_path / "out")])


def test_staging_folder_of_a_killed_run_is_removed(oracle_fp32, tmp_path):
    oracle, _ = oracle_fp32
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    (stale / "transformer").mkdir(parents=True)
    write_torch_pickle(oracle, tmp_path / "model.pt")
    convert_torch_weights.main([str(tmp_path / "model.pt"), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt", "out"]


def test_load_casts_to_requested_param_dtype(converted_pickle):
    model, params = load_transformer(converted_pickle, param_dtype="bfloat16", dtype="bfloat16")
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
    assert [path.name for path in tmp_path.iterdir()] == ["broken.pt"]  # no output, no partial staging folder


def test_load_places_params_with_the_requested_sharding(converted_pickle):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, params = load_transformer(converted_pickle, sharding=replicated)
    assert {leaf.sharding for leaf in jax.tree.leaves(params)} == {replicated}


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    """Run convert_torch_weights as its command line does; returns (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exited:
        cli.run(convert_torch_weights.main, [str(arg) for arg in argv])
    return exited.value.code, capsys.readouterr().err.splitlines()


def corrupt_safetensors(oracle, folder):
    good = write_flat_file(oracle, folder / "good.safetensors").read_bytes()
    (folder / "dit.safetensors").write_bytes(good[: len(good) // 2])
    return [folder / "dit.safetensors", "--config", "sana_wm_tiny"]


def pickle_without_config(oracle, folder):
    torch.save(dict(oracle.state_dict()), folder / "model.pt")
    return [folder / "model.pt"]


def output_not_empty(oracle, folder):
    (folder.parent / "out").mkdir()
    (folder.parent / "out" / "keep.txt").write_text("mine")
    return [write_torch_pickle(oracle, folder / "model.pt"), "--config", "sana_wm_tiny"]


def unknown_config(oracle, folder):
    return [write_torch_pickle(oracle, folder / "model.pt"), "--config", "sana_wm_huge"]


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda oracle, folder: [folder / "missing.safetensors"], "missing.safetensors: no such checkpoint"),
        (corrupt_safetensors, "dit.safetensors: truncated safetensors file"),
        (pickle_without_config, "carries no config.json: pass a config"),
        (output_not_empty, "already exists and is not empty"),
        (unknown_config, "unknown config 'sana_wm_huge'"),
    ],
    ids=["missing-path", "corrupt-safetensors", "pickle-without-config", "output-not-empty", "unknown-config"],
)
def test_bad_input_is_one_line_exit_2_and_no_output(oracle_fp32, tmp_path, capsys, make_input, message):
    oracle, _ = oracle_fp32
    (tmp_path / "in").mkdir()
    argv = make_input(oracle, tmp_path / "in")
    out = tmp_path / "out"
    before = sorted(tmp_path.rglob("*"))
    code, lines = run_cli([argv[0], out, *argv[1:]], capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing left half-written


def test_mismatch_error_sums_up_on_its_first_line(oracle_fp32, tmp_path, capsys):
    oracle, _ = oracle_fp32
    state = dict(oracle.state_dict())
    del state["blocks.2.attn.k_proj_cam.bias"]
    state["final_layer.linear.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "broken.pt")
    code, lines = run_cli([tmp_path / "broken.pt", tmp_path / "out", "--config", "sana_wm_tiny"], capsys)
    assert code == 2
    assert "1 missing key(s), 1 shape mismatch(es); first missing: blocks.2.attn.k_proj_cam.bias" in lines[0]
    assert any("final_layer.linear.weight: source (5, 64)" in line for line in lines[1:])
    assert [path.name for path in tmp_path.iterdir()] == ["broken.pt"]


def folder_of_class(class_name, subfolder=""):
    def make(oracle, folder):
        model_dir = folder / "release" / subfolder
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps({"_class_name": class_name}))
        save_file({"weight": torch.zeros(2)}, str(model_dir / "diffusion_pytorch_model.safetensors"))
        return [folder / "release"]
    return make


def nvlabs_repo(model_section, file_name="sana_wm_1600m_720p.safetensors"):
    def make(oracle, folder):
        (folder / "repo" / "dit").mkdir(parents=True)
        if model_section is not None:
            (folder / "repo" / "config.yaml").write_text(json.dumps({"model": model_section}))  # JSON is YAML
        return [write_flat_file(oracle, folder / "repo" / "dit" / file_name), "--config", "sana_wm_tiny"]
    return make


@pytest.mark.parametrize(
    "make_input, message",
    [
        (folder_of_class("SanaWMLTX2RefinerTransformer3DModel"), "is a SANA-WM stage-2 refiner transformer folder"),
        (folder_of_class("SanaWMLTX2RefinerTransformer3DModel", "transformer"), "refiner transformer folder"),
        (folder_of_class("LTX2TextConnectors"), "is a SANA-WM refiner text-connector folder"),
        (folder_of_class("AutoencoderKLLTX2Video"), "is an LTX-2 video VAE folder"),
        (folder_of_class("AutoencoderKLCausalLTX2Video"),
         "is a causal LTX-2 video VAE folder (the streaming release's ltx2_causal_vae) (AutoencoderKLCausalLTX2Video "
         "in config.json); give it as the VAE (--vae), not as the DiT"),
    ],
    ids=["refiner", "refiner-root", "connectors", "vae", "causal-vae"],
)
def test_other_architectures_are_refused_by_name(oracle_fp32, tmp_path, capsys, make_input, message):
    oracle, _ = oracle_fp32
    (tmp_path / "in").mkdir()
    argv = make_input(oracle, tmp_path / "in")
    code, lines = run_cli([argv[0], tmp_path / "out", *argv[1:]], capsys)
    assert code == 2
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bidirectional_release_folder_with_its_config_yaml_is_accepted(oracle_fp32, expected_params, tmp_path):
    oracle, _ = oracle_fp32
    released = {"model": "SanaMSVideoCamCtrl_1600M_P1_D20", "attn_type": "BidirectionalGDNTriton",  # its yaml
                "camctrl_type": "BidirectionalGDNUCPESinglePathLiteLABothTriton", "ffn_type": "GLUMBConvTemp",
                "pos_embed_type": "wan_rope", "chunk_split_strategy": "first_chunk_plus_one"}
    nvlabs_repo(released)(oracle, tmp_path)
    convert_torch_weights.main([str(tmp_path / "repo"), str(tmp_path / "out"), "--config", "sana_wm_tiny"])
    chex.assert_trees_all_equal(load_transformer(tmp_path / "out")[1], expected_params)


@pytest.mark.parametrize("change", [{"hidden_size": 96}, {"num_layers": 2}], ids=["width", "depth"])
def test_checkpoint_of_another_config_names_the_first_mismatching_parameter(converted_pickle, tmp_path, change):
    shutil.copytree(converted_pickle, tmp_path / "out")
    config_path = tmp_path / "out" / "transformer" / "config.json"
    other = SanaWMConfig.from_dict({**json.loads(config_path.read_text()), **change})
    config_path.write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError) as error:
        load_transformer(tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message
    name, saved, wanted = re.search(r"parameter (\S+) is saved with shape (.+) but the model config expects (.+?);",
                                    message).groups()
    converted = store.restore_params(tmp_path / "out" / "transformer", abstract_params(PRESETS["sana_wm_tiny"]))
    saved_shapes = {"/".join(path): str(leaf.shape) for path, leaf in flatten(converted).items()}
    wanted_shapes = {"/".join(path): str(leaf.shape) for path, leaf in flatten(abstract_params(other)).items()}
    assert saved == saved_shapes.get(name, "(absent)") and wanted == wanted_shapes.get(name, "(absent)")
    assert saved != wanted


def test_sample_names_the_parameter_of_a_checkpoint_of_another_preset(converted_pickle, tmp_path, capsys):
    import sample
    from sanawm_jax import demo

    shutil.copytree(converted_pickle, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vae").mkdir()
    (tmp_path / "ckpt" / "vae" / "config.json").write_text("{}")  # never read: the DiT fails to load first
    other = PRESETS["sana_wm_tiny"].replace(hidden_size=96)
    (tmp_path / "ckpt" / "transformer" / "config.json").write_text(json.dumps(other.to_dict()))
    np.savez(tmp_path / "prompt.npz", prompt_embeds=np.zeros((1, 8, other.caption_channels), np.float32),
             prompt_attention_mask=np.ones((1, 8), np.int32))
    fx, fy, cx, cy = demo.example_intrinsics()
    argv = ["--checkpoint", tmp_path / "ckpt", "--image", demo.asset_path(demo.EXAMPLE_IMAGE), "--embeddings",
            tmp_path / "prompt.npz", "--cfg", "1", "--intrinsics", f"{fx},{fy},{cx},{cy}", "--action", "w-8",
            "--num-frames", "9", "--no-compilation-cache", "--out", tmp_path / "video.mp4"]
    with pytest.raises(SystemExit) as exited:
        cli.run(sample.main, [str(arg) for arg in argv])
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]  # the others report progress
    assert exited.value.code == 2 and not any("Traceback" in line for line in lines)
    assert len(errors) == 1 and re.search(r"parameter \S+ is saved with shape \(.*64.*\) but the model config "
                                          r"expects \(.*96.*\)", errors[0]), errors
    assert not (tmp_path / "video.mp4").exists()
