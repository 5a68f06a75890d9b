"""Released refiner folders (both layouts, sharded safetensors with an index) convert shard by shard into our
format, load back equal to the in-memory conversion, and a broken checkpoint gets one strict report."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sanawm_jax.checkpoint.keymap import ConversionError
from sanawm_jax.demo import byte_tokenizer
from sanawm_jax.models.refiner.release import convert_refiner_release, find_refiner_folders, load_refiner_components
from tests.test_refiner_sampler import CONNECTORS, tiny_hf_gemma3_config


def save_sharded(folder, state, stem, num_shards=2, config=None):
    """`state` as `{stem}-0000i-of-0000n.safetensors` shards + `{stem}.safetensors.index.json` (+ config.json)."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for index in range(num_shards):
        name = f"{stem}-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[index::num_shards]
        save_file({key: state[key].float().contiguous() for key in part}, folder / name)
        weight_map.update({key: name for key in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def release_models():
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from transformers import Gemma3ForConditionalGeneration

    from tests.test_refiner_transformer import build_oracle

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    hf = tiny_hf_gemma3_config(len(tokenizer))
    transformer, transformer_config = build_oracle()
    return {
        "transformer": (transformer.state_dict(), {"_class_name": "SanaWMLTX2RefinerTransformer3DModel",
                                                   **transformer_config}),
        "connectors": (LTX2TextConnectors(**CONNECTORS).state_dict(), {"_class_name": "LTX2TextConnectors",
                                                                       **CONNECTORS}),
        "gemma": (Gemma3ForConditionalGeneration(hf).state_dict(), hf.to_dict()),
        "tokenizer": tokenizer,
    }


def write_release(root, models, layout, drop=None):
    refiner = root / ("refiner" if layout == "bidirectional" else "refiner_diffusers")
    for name in ("transformer", "connectors"):
        state, config = models[name]
        state = {k: v for k, v in state.items() if k != drop}
        save_sharded(refiner / name, state, "diffusion_pytorch_model", config=config)
    gemma = refiner / "text_encoder" if layout == "bidirectional" else root / "gemma3_12b"
    save_sharded(gemma, models["gemma"][0], "model", num_shards=3, config=models["gemma"][1])
    models["tokenizer"].save_pretrained(refiner / "tokenizer" if layout == "bidirectional" else gemma)
    return refiner


@pytest.mark.parametrize("layout", ["bidirectional", pytest.param("streaming", marks=pytest.mark.slow)])
def test_release_layout_converts_in_parts_and_loads(tmp_path, release_models, layout):
    from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
    from sanawm_jax.models.refiner.checkpoint import convert

    write_release(tmp_path / "release", release_models, layout)
    assert find_refiner_folders(tmp_path / "release").layout == layout
    lines = []
    out = convert_refiner_release(tmp_path / "release", tmp_path / "out", param_dtype="float32", log=lines.append)
    assert sum("not converted" in line for line in lines) == 3  # audio (x2) and the vision tower, one line each
    assert len(list((out / "transformer" / "params").glob("part-*"))) == 2
    assert len(list((out / "text_encoder" / "params").glob("part-*"))) == 3
    model, params, encoder = load_refiner_components(out)
    state, _ = release_models["transformer"]
    expected = convert(TorchStateDictSource({k: v.float() for k, v in state.items()}, "ref"), model.config,
                               log=lambda *_: None)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), expected)
    text, mask = encoder.encode("a cat")
    assert text.shape == (1, 1024, CONNECTORS["caption_channels"]) and mask.shape == (1, 1024)


def test_broken_release_gets_one_strict_report(tmp_path, release_models):
    write_release(tmp_path / "release", release_models, "bidirectional", drop="proj_in.bias")
    with pytest.raises(ConversionError, match="1 missing key.*proj_in.bias"):
        convert_refiner_release(tmp_path / "release", tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_refiner_saved_in_parts_restores_sharded_over_fsdp_and_tensor(multi_device):
    """Parameters written in parts restore sharded over fsdp=2 x tensor=2 (the query projection's input over fsdp,
    its heads over tensor); the sharded forward equals the unsharded one (relative L2 <= 1e-5: the same float32
    math, only the reduction order of sharded matmuls differs)."""
    result = multi_device("sharded_refiner_forward")
    assert result["split_params"] > 0 and result["query_kernel_spec"] == ["fsdp", "tensor"]
    assert result["relative_l2"] <= 1e-5
