"""The whole refinement stage equals diffusers' `SanaWMLTX2Refiner` (prompt -> Gemma-3 -> connectors, sink capture,
re-noised blocks, 3 Euler steps each, post-RoPE history capture and its trimming) with converted random weights of
tiny models and the pipeline's own noise draws.

The oracle's models run in float64 but its Euler arithmetic in float32; ours in float32 end to end, so relative L2
<= 1e-4 (the issue's bound) covers float32 round-off through 1 + 3 x 4 forwards of 2 blocks each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.demo import byte_tokenizer
from sanawm_jax.models.gemma.checkpoint import convert_gemma3_params
from sanawm_jax.models.gemma.gemma3 import Gemma3Config
from sanawm_jax.models.refiner.checkpoint import convert
from sanawm_jax.models.refiner.config import ConnectorsConfig, RefinerConfig
from sanawm_jax.models.refiner.prompt import RefinerTextEncoder
from sanawm_jax.models.refiner.sampler import block_bounds, refine_latents
from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer
from tests.conftest import randomize_
from tests.test_refiner_transformer import build_oracle, relative_l2

TOL = 1e-4
FPS = 16.0
TEXT_LENGTH = 8
PROMPT = "  a cat "
GEMMA3 = dict(hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=6, sliding_window=3, query_pre_attn_scalar=6, sliding_window_pattern=2)
CONNECTORS = dict(caption_channels=12, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                  video_connector_attention_head_dim=6, video_connector_num_layers=1,
                  video_connector_num_learnable_registers=4, audio_connector_num_attention_heads=2,
                  audio_connector_attention_head_dim=6, audio_connector_num_layers=1,
                  audio_connector_num_learnable_registers=4, connector_rope_base_seq_len=16)


def tiny_hf_gemma3_config(vocab_size: int):
    """transformers' config of a tiny Gemma-3 (`GEMMA3`) with a vision tower, as the released text encoder has."""
    from transformers import Gemma3Config as HFGemma3Config

    return HFGemma3Config(text_config={**GEMMA3, "vocab_size": vocab_size}, vision_config=dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14), mm_tokens_per_image=4)


def state_source(module, name):
    return TorchStateDictSource({k: v.float() for k, v in module.state_dict().items()}, name)


@pytest.fixture(scope="module")
def refiner_oracle():
    """diffusers' refiner pipeline over tiny random float64 models, and our converted counterparts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    hf = tiny_hf_gemma3_config(len(tokenizer))
    text_encoder = randomize_(Gemma3ForConditionalGeneration(hf).eval(), seed=6).double()
    connectors = randomize_(LTX2TextConnectors(**CONNECTORS).eval(), seed=7).double()
    transformer, transformer_config = build_oracle()
    pipe = SanaWMLTX2Refiner(transformer=transformer, connectors=connectors, tokenizer=tokenizer,
                             text_encoder=text_encoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                             text_max_sequence_length=TEXT_LENGTH)
    pipe.set_progress_bar_config(disable=True)

    gemma_config = Gemma3Config.from_hf_config(hf.to_dict())
    connectors_config = ConnectorsConfig.from_diffusers_config(CONNECTORS)
    quiet = lambda *_: None
    encoder = RefinerTextEncoder(tokenizer, gemma_config,
                                 convert_gemma3_params(state_source(text_encoder, "gemma3"), gemma_config, quiet),
                                 connectors_config,
                                 convert(state_source(connectors, "connectors"), connectors_config, quiet),
                                 max_sequence_length=TEXT_LENGTH)
    config = RefinerConfig.from_diffusers_config(transformer_config)
    params = convert(state_source(transformer, "refiner"), config, quiet)
    return pipe, encoder, RefinerTransformer(config), params


def pipeline_noise(shape, bounds, seed):
    """The pipeline's per-block draws from a generator seeded `seed`, placed at their frames (B, C, F, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    noise = np.zeros(shape)
    for start, end in bounds:
        block = (shape[0], shape[1], end - start, *shape[3:])
        noise[:, :, start:end] = torch.randn(block, generator=generator, dtype=torch.float64).numpy()
    return noise


@pytest.mark.parametrize("num_frames,kv_max_frames", [(9, 5), pytest.param(6, 11, marks=pytest.mark.slow)])
def test_refinement_matches_diffusers_pipeline(refiner_oracle, num_frames, kv_max_frames):
    pipe, encoder, model, params = refiner_oracle
    rng = np.random.default_rng(num_frames)
    shape = (1, model.config.in_channels, num_frames, 2, 3)
    stage1 = rng.standard_normal(shape)
    with torch.no_grad():
        expected = pipe(torch.from_numpy(stage1), PROMPT, fps=FPS, generator=torch.Generator().manual_seed(11),
                        kv_max_frames=kv_max_frames, output_type="latent").numpy()
    noise = pipeline_noise(shape, block_bounds(num_frames, 1, 3), seed=11)
    channels_last = lambda a: np.moveaxis(a, 1, -1).astype(np.float32)
    text, mask = encoder.encode(PROMPT)
    ours = refine_latents(model, params, channels_last(stage1), text, mask, channels_last(noise), fps=FPS,
                  kv_max_frames=kv_max_frames)
    ours = np.moveaxis(np.asarray(ours), -1, 1)
    np.testing.assert_array_equal(ours[:, :, :1], stage1[:, :, :1].astype(np.float32))
    assert relative_l2(ours[:, :, 1:], expected[:, :, 1:]) <= TOL


@pytest.fixture(scope="module")
def tiny_refiner():
    """The demo's tiny refiner (random weights) with a random prompt encoding."""
    from sanawm_jax.demo import demo_refiner

    refiner = demo_refiner(seed=3, latent_channels=8)
    text, mask = refiner.text_encoder.encode("a cat")
    return refiner.model, refiner.params, text, mask


def test_refiner_text_encoders_of_one_config_share_one_compiled_program(tiny_refiner):
    """A second refiner's text encoder (other weights, same configs) compiles nothing and uses its own weights."""
    from sanawm_jax.demo import demo_refiner

    first, second = (demo_refiner(seed=seed, latent_channels=8).text_encoder for seed in (3, 4))
    np.testing.assert_array_equal(first.encode("a cat")[0], tiny_refiner[2])
    compiled = first._encode._cache_size()
    other = second.encode("a cat")[0]
    assert second._encode is first._encode and first._encode._cache_size() == compiled
    assert relative_l2(other, tiny_refiner[2]) > 1e-2


def clip(frames, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, frames, 2, 3, 8)).astype(np.float32) for _ in range(2)]


def test_stream_fed_in_pieces_equals_whole_clip_refinement(tiny_refiner):
    """Streaming (stage-1 frames arriving in uneven pieces, noise drawn by the stream from its key) refines exactly
    what the whole-clip sampler does with the same key's frame noise, window trimming included (7 frames, a window
    of 3 keeps 2 of the first block's 3 frames)."""
    import jax

    from sanawm_jax.models.refiner.sampler import RefinerStream, frame_noise

    model, params, text, mask = tiny_refiner
    latents, _ = clip(7)
    key = jax.random.key(5)
    whole = np.asarray(refine_latents(model, params, latents, text, mask, frame_noise(key, latents.shape), fps=FPS,
                                      kv_max_frames=3))
    stream = RefinerStream(model, params, text, mask, fps=FPS, kv_max_frames=3, key=key)
    pieces, start = [], 0
    for size in (1, 2, 3, 1):
        pieces += stream.push(latents[:, start:start + size])
        start += size
    pieces += stream.finish()
    assert [(a, b) for a, b, _ in pieces] == [(0, 1), (1, 4), (4, 7)]
    streamed = np.concatenate([np.asarray(frames) for _, _, frames in pieces], axis=1)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)


@pytest.mark.slow  # the fast tier checks the block loop against diffusers and the stream against the whole clip
def test_one_block_over_the_clip_is_the_sink_bidirectional_refiner(tiny_refiner):
    """With one block covering every frame after the sink, the chunk-causal refiner is the sink-bidirectional one:
    all frames denoised jointly, attending to the pre-RoPE sink rotated at frame 0. With blocks of 3 it is not
    (later blocks see refined history, earlier ones do not see later frames)."""
    from sanawm_jax.models.refiner.sampler import DISTILLED_SIGMAS, forward, frame_rope

    model, params, text, mask = tiny_refiner
    latents, noise = clip(7, seed=1)
    config = model.config
    apply = lambda x, sigma, frames, prefix=None, capture=None: forward(
        model, params, x.reshape(1, -1, 8), text, np.full((1, x[0].size // 8), sigma * 1000, np.float32),
        frame_rope(config, frames, 2, 3, FPS), mask, prefix, capture=capture)
    _, (sink_k, sink_v) = apply(latents[:, :1], 0.0, [0], capture="pre_rope")
    prefix = KVPrefix(sink_k, sink_v, frame_rope(config, [0], 2, 3, FPS))
    sigmas = np.asarray(DISTILLED_SIGMAS, np.float32)
    x = (1 - sigmas[0]) * latents[:, 1:] + sigmas[0] * noise[:, 1:]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * np.asarray(apply(x, sigma, range(1, 7), prefix)).reshape(x.shape)
    one_block = np.asarray(refine_latents(model, params, latents, text, mask, noise, fps=FPS, block_size=6))
    np.testing.assert_allclose(one_block[:, 1:], x, rtol=0, atol=1e-5)
    blocks_of_3 = np.asarray(refine_latents(model, params, latents, text, mask, noise, fps=FPS))
    assert np.abs(blocks_of_3[:, 4:] - x[:, 3:]).max() > 1e-3
