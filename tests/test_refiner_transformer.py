"""The Flax refiner transformer equals diffusers' `SanaWMLTX2RefinerTransformer3DModel` (video path) with converted
random weights, with and without the chunk-causal K/V prefix.

The oracle runs in float64 except where it rounds to float32 itself (RoPE tables and their application, the timestep
sinusoid), so relative L2 <= 1e-5 measures our float32 round-off over 2 blocks.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.refiner.checkpoint import convert, is_audio_key, key_table
from sanawm_jax.models.refiner.config import REFINER_PRESETS, RefinerConfig
from sanawm_jax.models.refiner.rope import rope_tables, video_fractions
from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer
from tests.conftest import randomize_

TOL = 1e-5
FPS = 16.0


def tiny_diffusers_config(rope_type="interleaved", gated=False):
    tiny = REFINER_PRESETS["ltx2_refiner_tiny"]
    fields = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "cross_attention_dim",
              "caption_channels", "num_layers", "pos_embed_max_pos", "base_height", "base_width")
    return {**{name: getattr(tiny, name) for name in fields}, "rope_type": rope_type, "gated_attn": gated,
            "audio_in_channels": 4, "audio_out_channels": 4, "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8}


def build_oracle(**kwargs):
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    torch.manual_seed(0)
    config = tiny_diffusers_config(**kwargs)
    model = SanaWMLTX2RefinerTransformer3DModel(**config).eval()
    randomize_(model, seed=3)
    return model.double(), config


def converted(oracle, config, log=lambda *_: None):
    ours = RefinerConfig.from_diffusers_config(config)
    state = {k: v.float() for k, v in oracle.state_dict().items()}
    return ours, convert(TorchStateDictSource(state, "tiny refiner"), ours, log=log)


def relative_l2(ours, reference):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


def our_rope(config, frames, height, width):
    fractions = video_fractions(frames, height, width, scale_factors=config.vae_scale_factors,
                                causal_offset=config.causal_offset, fps=FPS,
                                max_positions=(config.pos_embed_max_pos, config.base_height, config.base_width))
    return rope_tables(fractions, config.inner_dim, config.rope_theta, config.rope_type, config.num_attention_heads)


def inputs(config, rng, batch, frames, height, width, text_lengths):
    n = len(frames) * height * width
    tokens = rng.standard_normal((batch, n, config.in_channels))
    text = rng.standard_normal((batch, max(text_lengths), config.caption_channels))
    mask = np.zeros((batch, max(text_lengths)), np.int64)
    for b, length in enumerate(text_lengths):
        mask[b, :length] = 1
    timesteps = rng.uniform(0, 1000, (batch, n))
    return tokens, text, mask, timesteps


@pytest.mark.parametrize("rope_type,gated", [("interleaved", False), ("split", True)])
def test_forward_matches_diffusers(rope_type, gated):
    oracle, dconfig = build_oracle(rope_type=rope_type, gated=gated)
    config, params = converted(oracle, dconfig)
    rng = np.random.default_rng(0)
    frames, height, width = [2, 3], 3, 4
    tokens, text, mask, timesteps = inputs(config, rng, 2, frames, height, width, (5, 2))
    with torch.no_grad():
        rope = oracle.build_rotary_emb_for_absolute_positions(2, frames, height, width, "cpu", FPS)
        expected = oracle(hidden_states=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(text),
                          timestep=torch.from_numpy(timesteps), video_rotary_emb=rope,
                          encoder_attention_mask=torch.from_numpy(mask), return_dict=False)[0].numpy()
    ours = jax.jit(RefinerTransformer(config).apply)(
        {"params": params}, tokens.astype(np.float32), text.astype(np.float32), timesteps.astype(np.float32),
        our_rope(config, frames, height, width), mask)
    assert ours.shape == expected.shape
    assert relative_l2(ours, expected) <= TOL


def test_kv_prefix_matches_diffusers_cache():
    """Sink captured pre-RoPE at sigma 0, history captured post-RoPE, then a block attending to both."""
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    oracle, dconfig = build_oracle()
    config, params = converted(oracle, dconfig)
    model = RefinerTransformer(config)
    rng = np.random.default_rng(1)
    height, width, batch = 2, 3, 2
    sink, hist, block = [0], [3, 4], [5, 6]
    sink_tokens, text, mask, _ = inputs(config, rng, batch, sink, height, width, (4, 3))
    hist_tokens = rng.standard_normal((batch, len(hist) * height * width, config.in_channels))
    block_tokens = rng.standard_normal((batch, len(block) * height * width, config.in_channels))
    t = lambda a: torch.from_numpy(a)
    f32 = lambda a: np.asarray(a, np.float32)
    zeros = lambda a: np.zeros(a.shape[:2])

    cache = SanaWMRefinerKVCache(config.num_layers)
    with torch.no_grad():
        def run(tokens, frames, timesteps, mode):
            rope = oracle.build_rotary_emb_for_absolute_positions(batch, frames, height, width, "cpu", FPS)
            return oracle(hidden_states=t(tokens), encoder_hidden_states=t(text), timestep=t(timesteps),
                          video_rotary_emb=rope, encoder_attention_mask=t(mask), kv_cache=cache,
                          kv_cache_mode=mode, return_dict=False)[0].numpy()

        run(sink_tokens, sink, zeros(sink_tokens), "capture_pre_rope")
        for layer in cache.layer_caches:
            layer.store_sink(*layer.get_captured_pre_rope())
        cache.sink_pe = oracle.build_rotary_emb_for_absolute_positions(batch, [2], height, width, "cpu", FPS)
        run(hist_tokens, hist, zeros(hist_tokens), "inject_and_capture_post_rope")
        for layer in cache.layer_caches:
            layer.store_history(*layer.get_captured_post_rope())
        timesteps = np.full(block_tokens.shape[:2], 725.0)
        expected = run(block_tokens, block, timesteps, "inject")

    apply = jax.jit(model.apply, static_argnames="capture")
    variables = {"params": params}
    _, (sink_k, sink_v) = apply(variables, f32(sink_tokens), f32(text), f32(zeros(sink_tokens)),
                                our_rope(config, sink, height, width), mask, capture="pre_rope")
    prefix = KVPrefix(sink_k, sink_v, our_rope(config, [2], height, width))
    _, (hist_k, hist_v) = apply(variables, f32(hist_tokens), f32(text), f32(zeros(hist_tokens)),
                                our_rope(config, hist, height, width), mask, prefix, capture="post_rope")
    prefix = prefix._replace(history_k=hist_k, history_v=hist_v)
    ours = apply(variables, f32(block_tokens), f32(text), f32(timesteps), our_rope(config, block, height, width),
                 mask, prefix)
    assert relative_l2(ours, expected) <= TOL


def test_converter_skips_audio_in_one_line_and_is_strict():
    oracle, dconfig = build_oracle()
    lines = []
    config, _ = converted(oracle, dconfig, log=lines.append)
    assert len(lines) == 1 and "audio_proj_in.weight" in lines[0] and "audio_attn1" in lines[0]
    state = {k: v.float() for k, v in oracle.state_dict().items() if k != "proj_in.bias"}
    with pytest.raises(ValueError, match="1 missing key.*proj_in.bias"):
        convert(TorchStateDictSource(state, "broken"), config, log=lambda *_: None)


def test_released_key_table_matches_diffusers_meta_model():
    """Every video tensor of the full-size model, with its shape, exists in diffusers' default-config model."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    with torch.device("meta"):
        model = SanaWMLTX2RefinerTransformer3DModel()
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = key_table(REFINER_PRESETS["ltx2_refiner"])
    assert ours == {k: v for k, v in theirs.items() if not is_audio_key(k)}
