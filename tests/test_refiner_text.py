"""The refiner's text path equals the diffusers / transformers oracle: Gemma-3's hidden-state stack (transformers'
`Gemma3ForConditionalGeneration`), its normalisation as the refiner pipeline packs it, and `LTX2TextConnectors`
(with and without learnable registers), all with converted random weights, left padding, batch 2 of different prompt
lengths.

Oracles run in float64; ours in float32, so relative L2 <= 1e-5 bounds our float32 round-off (through 3 Gemma
layers and 2 connector blocks).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.gemma.checkpoint import convert_gemma3_params
from sanawm_jax.models.gemma.gemma3 import GEMMA3_PRESETS, Gemma3Config, Gemma3Model
from sanawm_jax.models.refiner.checkpoint import convert, is_audio_key, key_table
from sanawm_jax.models.refiner.config import ConnectorsConfig
from sanawm_jax.models.refiner.connectors import TextConnectors, normalize_text_states
from tests.conftest import randomize_

TOL = 1e-5
LENGTHS = (7, 3)
SEQ = 8
TINY_GEMMA3 = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                   sliding_window_pattern=2,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def relative_l2(ours, reference):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


def left_padded(rng, vocab):
    ids = rng.integers(1, vocab, (len(LENGTHS), SEQ))
    mask = np.zeros((len(LENGTHS), SEQ), np.int64)
    for b, length in enumerate(LENGTHS):
        mask[b, SEQ - length:] = 1
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module")
def gemma3_oracle():
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    hf = HFGemma3Config(text_config=TINY_GEMMA3, vision_config=dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14), mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(hf).eval()
    randomize_(model, seed=5)
    return model.double(), hf.to_dict()


def test_gemma3_hidden_state_stack_and_packing_match_transformers(gemma3_oracle):
    from diffusers.pipelines.sana_wm.refiner import _pack_text_embeds

    model, hf_config = gemma3_oracle
    config = Gemma3Config.from_hf_config(hf_config)
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert config.rope_scaling_factor == 8.0
    lines = []
    state = {k: v.float() for k, v in model.state_dict().items()}
    params = convert_gemma3_params(TorchStateDictSource(state, "tiny gemma3"), config, log=lines.append)
    assert len(lines) == 1 and "vision_tower" in lines[0]
    ids, mask = left_padded(np.random.default_rng(0), config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
        stack = torch.stack(out.hidden_states, dim=-1)
        packed = _pack_text_embeds(stack, torch.from_numpy(mask).sum(-1), device="cpu", padding_side="left").numpy()
    stack = stack.numpy()
    ours = jax.jit(Gemma3Model(config).apply)({"params": params}, ids, mask)
    assert ours.shape == stack.shape == (2, SEQ, 16, 4)
    valid = mask.astype(bool)
    assert relative_l2(np.asarray(ours)[valid], stack[valid]) <= TOL
    ours_packed = normalize_text_states(ours, mask.sum(-1))
    assert relative_l2(ours_packed, packed) <= TOL
    assert np.all(np.asarray(ours_packed)[~valid] == 0)


def connectors_oracle(registers):
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    config = dict(caption_channels=12, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                  video_connector_attention_head_dim=6, video_connector_num_layers=2,
                  video_connector_num_learnable_registers=registers, audio_connector_num_attention_heads=2,
                  audio_connector_attention_head_dim=6, audio_connector_num_layers=1,
                  audio_connector_num_learnable_registers=registers, connector_rope_base_seq_len=16,
                  rope_type="split" if registers is None else "interleaved", proj_bias=registers is None)
    model = LTX2TextConnectors(**config).eval()
    randomize_(model, seed=4)
    return model.double(), config


@pytest.mark.parametrize("registers", [4, None])
def test_connectors_match_diffusers(registers):
    oracle, dconfig = connectors_oracle(registers)
    config = ConnectorsConfig.from_diffusers_config(dconfig)
    lines = []
    params = convert(TorchStateDictSource({k: v.float() for k, v in oracle.state_dict().items()}, "tiny"), config,
                     log=lines.append)
    assert len(lines) == 1 and "audio_connector" in lines[0]
    rng = np.random.default_rng(1)
    _, mask = left_padded(rng, 2)
    states = rng.standard_normal((2, SEQ, 12 * 3)) * 3.0
    with torch.no_grad():
        expected, _, expected_mask = oracle(torch.from_numpy(states), torch.from_numpy(mask))
    ours, ours_mask = jax.jit(TextConnectors(config).apply)({"params": params}, states.astype(np.float32), mask)
    assert relative_l2(ours, expected.numpy()) <= TOL
    np.testing.assert_array_equal(ours_mask, expected_mask.numpy())


def test_released_key_tables():
    """Full-size names and shapes equal diffusers' default-config connectors (audio excluded) and Gemma-3-12B's."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    from sanawm_jax.models.gemma.checkpoint import abstract_gemma3_params, hf_key
    from sanawm_jax.checkpoint.keymap import flatten, torch_shape

    with torch.device("meta"):
        model = LTX2TextConnectors()
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_audio_key(k)}
    assert key_table(ConnectorsConfig()) == theirs

    from transformers import Gemma3TextConfig, Gemma3TextModel

    hf = Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                          num_key_value_heads=8, sliding_window=1024,
                          rope_scaling={"rope_type": "linear", "factor": 8.0})
    with torch.device("meta"):
        text_model = Gemma3TextModel(hf)
    theirs = {k: tuple(v.shape) for k, v in text_model.state_dict().items()}
    config = GEMMA3_PRESETS["gemma3_12b"]
    assert Gemma3Config.from_hf_config(hf.to_dict()) == config
    ours = {hf_key(path): torch_shape(leaf.shape, path[-1])
            for path, leaf in flatten(abstract_gemma3_params(config)).items()}
    assert ours == theirs
