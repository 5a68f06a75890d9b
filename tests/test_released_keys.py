"""The released key layouts: the stored tables are the released checkpoints' tensor names and shapes, our key map
produces exactly them, and synthetic files with exactly those names convert to the same params in either layout."""

from __future__ import annotations

import collections
import copy
import json
import re

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
    load_null_caption_embedding,
    released_table,
    released_tensor_shapes,
)
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.pipeline import convert_pipeline

# Facts about the released dit/sana_wm_1600m_720p.safetensors from a header inspection (UPSTREAM_NOTES.md, section 7):
# 872 F32 tensors, counted by first name component, and a few names with their shapes.
RELEASED_FILE_COUNTS = {
    "blocks": 850, "y_embedder": 5, "t_embedder": 4, "t_block": 2, "x_embedder": 2, "final_layer": 3,
    "plucker_embedder": 2, "raymap_embedder": 2, "pos_embed": 1, "attention_y_norm": 1,
}
RELEASED_FILE_EXAMPLES = {
    "blocks.0.attn.A_log": (20,),
    "blocks.0.attn.beta_proj.weight": (20, 2240),
    "blocks.0.attn.conv_k.weight": (2240, 1, 4),
    "x_embedder.proj.weight": (2240, 128, 1, 1, 1),
    "pos_embed": (1, 484, 2240),
    "attention_y_norm.weight": (2240,),
    "t_block.1.weight": (6 * 2240, 2240),
    "t_block.1.bias": (6 * 2240,),
}
# Where NVlabs' modules are named differently from diffusers' (NVlabs/Sana sana_blocks.py: TimestepEmbedder is an
# nn.Sequential `mlp`), and the buffers only NVlabs saves (CaptionEmbedder.y_embedding, Sana.pos_embed).
NVLABS_NAMES = {"t_embedder.linear_1.": "t_embedder.mlp.0.", "t_embedder.linear_2.": "t_embedder.mlp.2."}


def block_index(name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


@pytest.fixture(scope="module")
def rule_2_6b():
    return released_tensor_shapes(PRESETS["sana_wm_2.6b"])


@pytest.fixture(scope="module")
def rule_tiny():
    return released_tensor_shapes(PRESETS["sana_wm_tiny"])


def test_diffusers_table_is_the_diffusers_state_dict():
    from diffusers import SanaWMTransformer3DModel

    with torch.device("meta"):
        model = SanaWMTransformer3DModel()  # its defaults are the released 2.6B model
    state = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert released_table("diffusers") == state


def test_nvlabs_table_agrees_with_the_released_file_header():
    table = released_table("nvlabs")
    assert len(table) == 872
    assert collections.Counter(name.split(".")[0] for name in table) == RELEASED_FILE_COUNTS
    assert {name: table[name] for name in RELEASED_FILE_EXAMPLES} == RELEASED_FILE_EXAMPLES
    diffusers = released_table("diffusers")
    renamed = {next((name.replace(a, b) for a, b in NVLABS_NAMES.items() if name.startswith(a)), name): shape
               for name, shape in diffusers.items()}
    assert {name: shape for name, shape in table.items() if name in renamed} == renamed
    assert set(table) - set(renamed) == {"pos_embed", "y_embedder.y_embedding"}
    assert table["y_embedder.y_embedding"] == (300, 2304)  # model_max_length x Gemma-2 hidden size


def test_key_map_produces_both_released_tables(rule_2_6b):
    for layout in ("diffusers", "nvlabs"):
        assert rule_2_6b[layout] == released_table(layout), layout


def test_small_config_has_the_released_names_with_fewer_blocks(rule_tiny, tiny_oracle):
    tiny = PRESETS["sana_wm_tiny"]
    for layout in ("diffusers", "nvlabs"):
        released = {name for name in released_table(layout)
                    if block_index(name) is None or block_index(name) < tiny.num_layers}
        assert set(rule_tiny[layout]) == released, layout
    oracle, _ = tiny_oracle
    assert rule_tiny["diffusers"] == {name: tuple(tensor.shape) for name, tensor in oracle.state_dict().items()}


def nvlabs_state_dict(oracle, shapes: dict) -> dict:
    """The oracle's tensors under NVlabs names, plus random pos_embed and null caption embedding of `shapes`."""
    state = {}
    for name, tensor in oracle.state_dict().items():
        for diffusers_prefix, nvlabs_prefix in NVLABS_NAMES.items():
            name = name.replace(diffusers_prefix, nvlabs_prefix) if name.startswith(diffusers_prefix) else name
        state[name] = tensor.contiguous()
    generator = torch.Generator().manual_seed(3)
    for name in ("pos_embed", "y_embedder.y_embedding"):
        state[name] = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
    return state


def test_released_nvlabs_names_convert_bit_for_bit_like_the_diffusers_folder(tiny_oracle, rule_tiny, tmp_path):
    oracle, diffusers_config = tiny_oracle
    oracle = copy.deepcopy(oracle).float()
    state = nvlabs_state_dict(oracle, rule_tiny["nvlabs"])
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == rule_tiny["nvlabs"]
    dit = tmp_path / "SANA-WM_bidirectional" / "dit" / "sana_wm_1600m_720p.safetensors"
    dit.parent.mkdir(parents=True)
    save_file(state, str(dit))
    (tmp_path / "tiny.json").write_text(json.dumps(diffusers_config))
    oracle.save_pretrained(tmp_path / "diffusers" / "transformer")

    log = []
    convert_pipeline(dit, tmp_path / "from_nvlabs", PRESETS["sana_wm_tiny"], log=log.append)
    convert_torch_weights.main([str(tmp_path / "diffusers"), str(tmp_path / "from_diffusers")])
    _, nvlabs_params = load_transformer(tmp_path / "from_nvlabs")
    _, diffusers_params = load_transformer(tmp_path / "from_diffusers")
    assert jax.tree.structure(nvlabs_params) == jax.tree.structure(diffusers_params)
    for a, b in zip(jax.tree.leaves(nvlabs_params), jax.tree.leaves(diffusers_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    np.testing.assert_array_equal(load_null_caption_embedding(tmp_path / "from_nvlabs"),
                                  state["y_embedder.y_embedding"].numpy())
    assert load_null_caption_embedding(tmp_path / "from_diffusers") is None
    unused = [line for line in log if line.startswith("not converted")]
    assert len(unused) == 1
    assert unused[0].endswith(f": blocks.N.attn.recall_gate (x{oracle.config.num_layers}), pos_embed")
    assert any("kept y_embedder.y_embedding (300, 32) as the null caption embedding" in line for line in log)


def test_nvlabs_null_caption_embedding_is_checked_like_every_tensor(tiny_oracle, rule_tiny):
    oracle, _ = tiny_oracle
    state = nvlabs_state_dict(copy.deepcopy(oracle).float(), rule_tiny["nvlabs"])
    state["y_embedder.y_embedding"] = torch.zeros(300, 31)
    with pytest.raises(ConversionError, match=r"first mis-shaped: y_embedder\.y_embedding: source \(300, 31\)"):
        convert_state_dict(TorchStateDictSource(state, "edited"), PRESETS["sana_wm_tiny"], log=lambda *_: None)
    del state["y_embedder.y_embedding"]
    with pytest.raises(ConversionError, match=r"first missing: y_embedder\.y_embedding"):
        convert_state_dict(TorchStateDictSource(state, "edited"), PRESETS["sana_wm_tiny"], log=lambda *_: None)
