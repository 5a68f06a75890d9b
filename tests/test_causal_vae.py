"""The causal LTX-2 decoder decodes chunk by chunk with a carried cache, equal to decoding the whole clip and to
diffusers' `AutoencoderKLLTX2Video(decoder_causal=True)`; streamed frames go into a playable mp4 as they come.

Tolerances (float32 on both sides): against diffusers rel L2 <= 1e-4, as in tests/test_vae.py (measured ~5e-7:
round-off through the convolution stack). Chunked against our own whole-clip decode: max |diff| <= 1e-5 on values of
magnitude ~3 (measured ~2e-6: the same convolutions over different frame ranges, fused differently by XLA).
"""

from __future__ import annotations

import json
import time

import chex
import numpy as np
import pytest
import torch

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.data.video import VideoWriter, read_video_window
from sanawm_jax.models.ltx2_vae import VAE_PRESETS, CausalDecoder, VAEConfig, convert_vae, decode, video_to_uint8
from sanawm_jax.models.ltx2_vae.checkpoint import convert_vae_state_dict
from tests.conftest import tiny_vae_oracle

FP32_TOLERANCE = 1e-4
CHUNKED_TOLERANCE = 1e-5
CHUNKS = (4, 3, 3)  # the streaming layout: a first block one frame longer, then blocks of 3 latent frames
LATENT_GRID = (2, 3)  # non-square, >= 2 for the decoder's reflect padding


@pytest.fixture(scope="module")
def causal_oracle():
    """Tiny float32 diffusers VAE with a causal decoder, every weight and both latent statistics non-zero random."""
    return tiny_vae_oracle(weight_seed=5, stats_seed=6, decoder_causal=True)


@pytest.fixture(scope="module")
def converted(causal_oracle):
    config = VAEConfig.from_diffusers_config(dict(causal_oracle.config))
    return config, convert_vae_state_dict(TorchStateDictSource(causal_oracle.state_dict(), "oracle"), config)


@pytest.fixture(scope="module")
def latents():
    shape = (1, sum(CHUNKS), *LATENT_GRID, VAE_PRESETS["ltx2_video_tiny"].latent_channels)
    return np.random.default_rng(7).standard_normal(shape, np.float32)


@pytest.fixture(scope="module")
def chunked_frames(converted, latents):
    """The pixel frames of each chunk, decoded one chunk after the other."""
    config, params = converted
    decoder = CausalDecoder(config)
    cache = decoder.init_cache(latents.shape[0], *LATENT_GRID)
    frames, start = [], 0
    for size in CHUNKS:
        chunk, cache = decoder.decode_chunk(params, latents[:, start : start + size], cache)
        frames.append(np.asarray(chunk))
        start += size
    return frames


def oracle_decode(oracle, latents):
    mean, std = oracle.latents_mean.view(1, -1, 1, 1, 1), oracle.latents_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = torch.from_numpy(latents).permute(0, 4, 1, 2, 3)
        video = oracle.decode(z / oracle.config.scaling_factor * std + mean, return_dict=False)[0]
    return video.permute(0, 2, 3, 4, 1).numpy()


def test_released_causal_config_keeps_the_decoder_causal(converted):
    config, _ = converted
    assert config.decoder_causal and config == VAE_PRESETS["ltx2_video_tiny"].replace(decoder_causal=True)


def test_chunks_have_one_frame_then_eight_per_latent_frame(chunked_frames):
    assert [chunk.shape[1] for chunk in chunked_frames] == [1 + 8 * (CHUNKS[0] - 1)] + [8 * n for n in CHUNKS[1:]]


def test_chunked_decode_equals_whole_clip_decode(converted, latents, chunked_frames):
    config, params = converted
    whole = np.asarray(decode(params, latents, config))
    chunked = np.concatenate(chunked_frames, axis=1)
    assert chunked.shape == whole.shape == (1, 1 + 8 * (sum(CHUNKS) - 1), 64, 96, 3)
    assert np.abs(chunked - whole).max() <= CHUNKED_TOLERANCE


def test_chunked_decode_matches_diffusers_causal_decoder(causal_oracle, latents, chunked_frames):
    expected = oracle_decode(causal_oracle, latents)
    chunked = np.concatenate(chunked_frames, axis=1).astype(np.float64)
    assert chunked.shape == expected.shape
    assert np.linalg.norm(chunked - expected) / np.linalg.norm(expected) <= FP32_TOLERANCE


def test_converter_reads_the_released_causal_vae_folder(causal_oracle, converted, tmp_path):
    """`ltx2_causal_vae/` is written by NVlabs' AutoencoderKLCausalLTX2Video: its class name, the decoder's upsampler
    kinds as `decoder_upsample_type` (null: all spatiotemporal) and a `gradient_checkpointing` flag."""
    folder = tmp_path / "ltx2_causal_vae"
    causal_oracle.save_pretrained(folder)
    fields = json.loads((folder / "config.json").read_text())
    fields.update(_class_name="AutoencoderKLCausalLTX2Video", decoder_upsample_type=None, gradient_checkpointing=False)
    del fields["upsample_type"]
    (folder / "config.json").write_text(json.dumps(fields))
    config, params = convert_vae(folder)
    assert config == converted[0]
    chex.assert_trees_all_equal(params, converted[1])


def test_non_causal_decoder_is_refused():
    with pytest.raises(ValueError, match="chunked decoding needs a causal decoder"):
        CausalDecoder(VAE_PRESETS["ltx2_video_tiny"])


def test_chunk_of_another_grid_is_refused(converted, latents):
    config, params = converted
    decoder = CausalDecoder(config)
    cache = decoder.init_cache(1, 3, 3)
    with pytest.raises(ValueError, match=r"grid 2x3 does not continue a clip of batch 1 and grid 3x3"):
        decoder.decode_chunk(params, latents[:, :4], cache)


def decoded_frame_count(path) -> int:
    try:
        return read_video_window(path, 0, 0)[1]
    except OSError:  # nothing decodable written yet
        return 0


def test_progressive_mp4_is_playable_while_written_and_holds_every_frame(chunked_frames, tmp_path):
    path = tmp_path / "stream.mp4"
    blocks = [video_to_uint8(chunk[0]) for chunk in chunked_frames]
    with VideoWriter(path, progressive=True, crf=0, pix_fmt="yuv444p") as writer:
        for block in blocks:
            writer.append(block)
        # Before the writer closes, the frames of the first block decode (ffmpeg runs asynchronously: wait for it).
        deadline = time.monotonic() + 60
        while decoded_frame_count(path) < len(blocks[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert decoded_frame_count(path) >= len(blocks[0])
    frames, total, size = read_video_window(path, 0, 1000)
    expected = np.concatenate(blocks)
    assert total == writer.num_frames == len(expected) and size == (64, 96)
    # crf 0 in yuv444p: only the RGB <-> YUV conversion rounds (a few levels of 255).
    assert np.abs(frames.astype(int) - expected).max() <= 4


def test_writer_refuses_frames_of_another_size(tmp_path):
    with VideoWriter(tmp_path / "bad.mp4") as writer:
        writer.append(np.zeros((2, 16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match=r"frames of size \(8, 16\) appended to a video of size \(16, 16\)"):
            writer.append(np.zeros((1, 8, 16, 3), np.uint8))
