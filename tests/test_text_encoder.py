"""The Gemma-2 text encoder equals transformers' Gemma-2 and the SANA-WM pipeline's `encode_prompt`.

A tiny random Gemma-2 (2 layers, hidden 64, 4 heads, 2 KV heads, head dim 16, sliding window 8 < sequence length,
attention soft-cap 5) and a word-level tokenizer covering the chi prompt are saved by the tests as a Hugging Face
folder and read back by our loader. Float32 tolerances (relative L2 <= 1e-4) allow for float32 round-off through two
layers (measured ~4e-7); bf16 compute is held to 3e-2 (8-bit mantissa, ~4e-3 per op, over the stack).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.sana_wm import pipeline_sana_wm
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config as HFGemma2Config
from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast
from transformers import Gemma2Model as HFGemma2Model

from sanawm_jax.checkpoint.keymap import ConversionError, flatten
from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.data import cache
from sanawm_jax.data.format import TextEmbeddingStore
from sanawm_jax.models.gemma import (
    DEFAULT_CHI_PROMPT,
    Gemma2Config,
    Gemma2Model,
    PromptEmbeddings,
    TextEncoder,
    load_embeddings_npz,
    load_gemma2,
    save_embeddings_npz,
)
from sanawm_jax.models.gemma.checkpoint import convert_gemma2_params
from sanawm_jax.models.gemma.encoder import forward_program, load_tokenizer

PROMPTS = ("a red car drives along a quiet coastal road at sunset", "a busy city street")
NEGATIVE = "blurry, deformed, static"
TINY_GEMMA2 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    query_pre_attn_scalar=16,
    attn_logit_softcapping=5.0,
)
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2


def relative_l2(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def word_level_tokenizer():
    """A Gemma-like tokenizer (ids pad 0, eos 1, bos 2, unk 3; BOS prepended) over every word the tests use."""
    text = " ".join([*DEFAULT_CHI_PROMPT, *PROMPTS, NEGATIVE])
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in sorted(set(re.findall(r"\w+|[^\w\s]+", text))):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def randomize_(model, seed):
    """Random weights everywhere (norm weights included), large enough that the logit soft-cap is active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face Gemma2ForCausalLM folder (config.json, model.safetensors, tokenizer files) and its model."""
    folder = tmp_path_factory.mktemp("gemma2")
    tokenizer = word_level_tokenizer()
    config = HFGemma2Config(vocab_size=len(tokenizer), **TINY_GEMMA2)
    torch.manual_seed(0)
    model = randomize_(Gemma2ForCausalLM(config), seed=1).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def encoder(hf_folder):
    return TextEncoder.from_pretrained(hf_folder[0])


def pipeline_encode_prompt(model, folder, prompt, negative, **kwargs):
    """The pipeline's own `encode_prompt` with our saved tokenizer and the torch Gemma-2 as text encoder."""
    pipe = pipeline_sana_wm.SanaWMPipeline(
        tokenizer=load_tokenizer(folder), text_encoder=model, vae=None, transformer=None, scheduler=None
    )
    with torch.no_grad():
        cond, cond_mask, neg, neg_mask = pipe.encode_prompt(prompt, negative, device="cpu", **kwargs)
    return cond[:, 0].numpy(), cond_mask.numpy(), neg[:, 0].numpy(), neg_mask.numpy()


def padded_batch(vocab_size, length=24, valid=(24, 7)):
    """Random ids (B, length) with right padding: row b has valid[b] tokens (7 < window 8, so later rows of the
    sliding layer see only padding)."""
    ids = torch.randint(4, vocab_size, (len(valid), length), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(length)[None, :] < torch.tensor(valid)[:, None]).long()
    return ids, mask


def test_last_hidden_state_matches_transformers_with_padding(hf_folder):
    folder, model = hf_folder
    config, params = load_gemma2(folder)
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    actual = Gemma2Model(config).apply({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert relative_l2(actual, expected) <= FP32_TOLERANCE


def test_bf16_compute_stays_close_to_transformers_fp32(hf_folder):
    folder, model = hf_folder
    config, params = load_gemma2(folder, param_dtype="bfloat16", dtype="bfloat16")
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    actual = Gemma2Model(config).apply({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert actual.dtype == jnp.bfloat16
    assert relative_l2(actual, expected) <= BF16_TOLERANCE


def test_parity_inputs_exercise_sliding_window_and_soft_cap(hf_folder):
    """Removing the window or the soft-cap changes the output by far more than the parity tolerance."""
    config, params = load_gemma2(hf_folder[0])
    ids, mask = (jnp.asarray(a.numpy()) for a in padded_batch(config.vocab_size))
    reference = Gemma2Model(config).apply({"params": params}, ids, mask)
    for change in (dict(sliding_window=None), dict(attn_logit_softcapping=None)):
        changed = Gemma2Model(dataclasses.replace(config, **change)).apply({"params": params}, ids, mask)
        assert relative_l2(changed, reference) > 100 * FP32_TOLERANCE, change


def test_sharded_bare_model_checkpoint_converts_to_the_same_params(hf_folder, tmp_path):
    folder, model = hf_folder
    bare = HFGemma2Model(model.config)
    bare.load_state_dict(model.model.state_dict())
    bare.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, expected = load_gemma2(folder)
    _, actual = load_gemma2(tmp_path)
    expected, actual = flatten(expected), flatten(actual)
    assert actual.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg="/".join(path))


def test_chi_prompt_is_the_pipeline_default():
    assert DEFAULT_CHI_PROMPT == tuple(pipeline_sana_wm.DEFAULT_CHI_PROMPT)


def test_prompt_and_negative_match_pipeline_encode_prompt(hf_folder, encoder):
    """Default chi prefix, 300 tokens: BOS + the last 299 states of the prefixed prompt; negative without prefix."""
    folder, model = hf_folder
    cond, cond_mask, neg, neg_mask = pipeline_encode_prompt(
        model, folder, PROMPTS[0], NEGATIVE, chi_prompt=list(pipeline_sana_wm.DEFAULT_CHI_PROMPT)
    )
    embeds, mask = encoder.encode(PROMPTS[0])
    negative_embeds, negative_mask = encoder.encode_negative(NEGATIVE)
    assert embeds.shape == cond.shape == (1, 300, 64)
    np.testing.assert_array_equal(mask, cond_mask)
    np.testing.assert_array_equal(negative_mask, neg_mask)
    assert relative_l2(embeds, cond) <= FP32_TOLERANCE
    assert relative_l2(negative_embeds, neg) <= FP32_TOLERANCE


def test_cached_null_text_is_the_empty_prompt_encoded_with_the_prefix(hf_folder, tmp_path):
    """Text dropout's null embedding is "" encoded as a caption is (chi prefix, BOS + last 299 states, its mask), as
    upstream's stage-1 trainer computes it; the pipeline's positive-prompt encoding of "" is the oracle. The
    prefix-free negative encoding of "" differs from it by far more than the tolerance."""
    folder, model = hf_folder
    store = TextEmbeddingStore(tmp_path)
    cache.cache_text([], cache.sanawm_text_encoder(str(folder)), store)
    null, null_mask = store.null()
    cond, cond_mask, neg, _ = pipeline_encode_prompt(
        model, folder, "", "", chi_prompt=list(pipeline_sana_wm.DEFAULT_CHI_PROMPT)
    )
    np.testing.assert_array_equal(null_mask, cond_mask[0].astype(bool))
    assert relative_l2(null, cond[0]) <= FP32_TOLERANCE
    assert relative_l2(null, neg[0]) > 100 * FP32_TOLERANCE


def test_truncated_prompt_with_custom_prefix_matches_pipeline(hf_folder):
    """A prompt longer than the kept length with a short prefix and max length 12: truncation happens before the
    selection, exactly as in the pipeline."""
    folder, model = hf_folder
    chi = ["Here are examples of how to transform", "User Prompt: "]
    long_prompt = " ".join(PROMPTS * 2)
    encoder = TextEncoder.from_pretrained(folder, chi_prompt=chi, max_sequence_length=12)
    cond, cond_mask, neg, neg_mask = pipeline_encode_prompt(
        model, folder, long_prompt, long_prompt, chi_prompt=chi, max_sequence_length=12
    )
    embeds, mask = encoder.encode(long_prompt)
    negative_embeds, negative_mask = encoder.encode_negative(long_prompt)
    assert mask.shape == (1, 12) and int(mask.sum()) == 12
    np.testing.assert_array_equal(mask, cond_mask)
    np.testing.assert_array_equal(negative_mask, neg_mask)
    assert relative_l2(embeds, cond) <= FP32_TOLERANCE
    assert relative_l2(negative_embeds, neg) <= FP32_TOLERANCE


def test_batched_prompts_equal_prompts_encoded_one_at_a_time(encoder):
    """Right padding to a fixed length with causal attention: each row depends on its own prompt only."""
    embeds, mask = encoder.encode(list(PROMPTS))
    for row, prompt in enumerate(PROMPTS):
        single, single_mask = encoder.encode(prompt)
        np.testing.assert_array_equal(mask[row], single_mask[0])
        assert relative_l2(embeds[row], single[0]) <= FP32_TOLERANCE


def test_encoders_of_one_config_share_one_compiled_forward(encoder):
    """A second TextEncoder of the same config (other weights) compiles nothing and still uses its own weights."""
    first = encoder.encode(PROMPTS[1])[0]
    compiled = forward_program(encoder.config)._cache_size()
    other = TextEncoder(encoder.tokenizer, encoder.config, jax.tree.map(lambda a: 1.5 * a, encoder.params))
    second = other.encode(PROMPTS[1])[0]
    assert other._forward is encoder._forward and forward_program(encoder.config)._cache_size() == compiled
    assert relative_l2(second, first) > 1e-2


def test_pipeline_root_with_subfolders_loads_like_a_model_folder(hf_folder, encoder, tmp_path):
    shutil.copytree(hf_folder[0], tmp_path / "text_encoder")
    shutil.copytree(hf_folder[0], tmp_path / "tokenizer")
    (tmp_path / "text_encoder" / "tokenizer.json").unlink()
    from_root = TextEncoder.from_pretrained(tmp_path)
    np.testing.assert_array_equal(from_root.encode(PROMPTS[1])[0], encoder.encode(PROMPTS[1])[0])


def test_missing_tokenizer_files_name_the_folder(hf_folder, tmp_path):
    shutil.copy(hf_folder[0] / "config.json", tmp_path)
    shutil.copy(hf_folder[0] / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no tokenizer files (expected one of tokenizer.json")):
        TextEncoder.from_pretrained(tmp_path)


def test_missing_weights_name_the_folder_and_files(hf_folder, tmp_path):
    shutil.copy(hf_folder[0] / "config.json", tmp_path)
    message = f"{tmp_path}: no weights (model.safetensors or model.safetensors.index.json)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_gemma2(tmp_path)


def test_missing_config_names_the_folder(hf_folder, tmp_path):
    shutil.copy(hf_folder[0] / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no config.json")):
        load_gemma2(tmp_path)


def test_missing_unexpected_and_misshapen_keys_are_named(hf_folder):
    folder, model = hf_folder
    config, _ = load_gemma2(folder)
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(8)
    with pytest.raises(ConversionError) as error:
        convert_gemma2_params(TorchStateDictSource(state, "edited state dict"), config)
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.weight (for layers_1/mlp/up_proj/kernel)" in message
    assert "model.layers.0.self_attn.k_proj.weight: source (16, 64)" in message
    assert "model.layers.0.self_attn.rotary.inv_freq" in message


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(model_type="gemma3"), "model_type='gemma3'"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type='linear'"),
    ],
)
def test_unsupported_hf_config_is_rejected_naming_the_field(hf_folder, change, message):
    hf = json.loads((hf_folder[0] / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(message)):
        Gemma2Config.from_hf_config({**hf, **change})


def test_legacy_hf_config_maps_rope_theta_and_default_layer_types():
    config = Gemma2Config.from_hf_config(
        {"model_type": "gemma2", "num_hidden_layers": 3, "rope_theta": 500.0, "hidden_act": "gelu_pytorch_tanh"}
    )
    assert config.rope_theta == 500.0
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")


def random_embeddings(batch=2, length=5, channels=8, negative_batch=1):
    rng = np.random.default_rng(0)
    return dict(
        prompt_embeds=rng.standard_normal((batch, length, channels)).astype(np.float32),
        prompt_attention_mask=np.ones((batch, length), np.int64),
        negative_prompt_embeds=rng.standard_normal((negative_batch, length, channels)).astype(np.float32),
        negative_prompt_attention_mask=np.ones((negative_batch, length), np.int64),
    )


def test_embeddings_npz_round_trip(tmp_path):
    arrays = random_embeddings()
    path = save_embeddings_npz(tmp_path / "text.npz", PromptEmbeddings(**arrays))
    loaded = load_embeddings_npz(path, caption_channels=8, max_sequence_length=5)
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, key), value)


def test_embeddings_npz_accepts_pipeline_layout_without_negatives(tmp_path):
    arrays = random_embeddings()
    pipeline_layout = arrays["prompt_embeds"][:, None]
    mask = arrays["prompt_attention_mask"]
    np.savez(tmp_path / "text.npz", prompt_embeds=pipeline_layout, prompt_attention_mask=mask)
    loaded = load_embeddings_npz(tmp_path / "text.npz", caption_channels=8, max_sequence_length=5)
    np.testing.assert_array_equal(loaded.prompt_embeds, arrays["prompt_embeds"])
    assert loaded.negative_prompt_embeds is None and loaded.negative_prompt_attention_mask is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("prompt_embeds", np.zeros((2, 5, 7), np.float32), "prompt_embeds has 7 channels, expected 8"),
        ("prompt_embeds", np.zeros((2, 6, 8), np.float32), "prompt_embeds has 6 tokens, expected 5"),
        ("prompt_attention_mask", np.ones((2, 4)), r"prompt_attention_mask has shape \(2, 4\), expected \(2, 5\)"),
        ("negative_prompt_embeds", np.zeros((1, 5, 9), np.float32), r"negative_prompt_embeds has shape \(1, 5, 9\)"),
        ("negative_prompt_attention_mask", np.ones((1, 3)), r"negative_prompt_attention_mask has shape \(1, 3\)"),
    ],
)
def test_embeddings_npz_with_wrong_shapes_names_the_key(tmp_path, key, value, message):
    np.savez(tmp_path / "bad.npz", **{**random_embeddings(), key: value})
    with pytest.raises(ValueError, match=rf"bad.npz: {message}"):
        load_embeddings_npz(tmp_path / "bad.npz", caption_channels=8, max_sequence_length=5)


def test_embeddings_npz_missing_or_unknown_keys_are_named(tmp_path):
    arrays = random_embeddings()
    np.savez(tmp_path / "missing.npz", prompt_embeds=arrays["prompt_embeds"])
    with pytest.raises(ValueError, match="missing.npz: missing key 'prompt_attention_mask'"):
        load_embeddings_npz(tmp_path / "missing.npz", caption_channels=8, max_sequence_length=5)
    np.savez(tmp_path / "unknown.npz", **arrays, embeds=arrays["prompt_embeds"])
    with pytest.raises(ValueError, match=r"unknown.npz: unknown key\(s\) \['embeds'\]"):
        load_embeddings_npz(tmp_path / "unknown.npz", caption_channels=8, max_sequence_length=5)
