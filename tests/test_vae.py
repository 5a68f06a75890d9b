"""The Flax LTX-2 video VAE equals diffusers' `AutoencoderKLLTX2Video` (tiny config, randomised weights), its converter
is strict, and tiled decoding is exact bookkeeping over the untiled decode.

Tolerances: float32 parity is rel L2 <= 1e-4 (measured ~5e-7: float32 round-off through the convolution stack, both
sides in float32). bfloat16 compute is compared to the float32 oracle at 3e-2 (8-bit mantissa, ~4e-3 per rounding,
accumulated through the stack); the same bound applies to float32 compute with weights rounded to bfloat16.
"""

from __future__ import annotations

import copy

import chex
import jax
import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor

from sanawm_jax.checkpoint.keymap import ConversionError
from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.ltx2_vae import (
    VAE_PRESETS,
    VAEConfig,
    convert_vae,
    decode,
    decode_tiled,
    encode,
    video_to_uint8,
)
from sanawm_jax.models.ltx2_vae.checkpoint import (
    convert_vae_state_dict,
    torch_key,
)
from tests.conftest import TINY_VAE_DIFFUSERS_CONFIG, tiny_vae_oracle

# The `ltx2_video_tiny` preset in diffusers' spelling. The compression ratios must be explicit: diffusers' default
# derivation assumes every block scales time and space (64/16).
HEIGHT, WIDTH = 64, 96  # latent grid 2x3: non-square, and >= 2 for the decoder's reflect padding
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2


def rel_l2(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.fixture(scope="module")
def oracle():
    """Tiny float32 diffusers VAE with every weight and both latent statistics non-zero random."""
    return tiny_vae_oracle(weight_seed=3, stats_seed=4)


@pytest.fixture(scope="module")
def converted(oracle):
    config = VAEConfig.from_diffusers_config(dict(oracle.config))
    return config, convert_vae_state_dict(TorchStateDictSource(oracle.state_dict(), "oracle"), config)


def oracle_statistics(oracle):
    return oracle.latents_mean.view(1, -1, 1, 1, 1), oracle.latents_std.view(1, -1, 1, 1, 1)


def oracle_encode(oracle, video):
    """As `SanaWMPipeline._encode_first_frame`: (mode - mean) * scaling_factor / std, channels-last."""
    mean, std = oracle_statistics(oracle)
    with torch.no_grad():
        mode = oracle.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mode()
        latents = (mode - mean) * oracle.config.scaling_factor / std
    return latents.permute(0, 2, 3, 4, 1).numpy()


def oracle_decode(oracle, latents):
    """As `SanaWMPipeline._decode_latents`: latents / scaling_factor * std + mean, decode with temb=None."""
    mean, std = oracle_statistics(oracle)
    with torch.no_grad():
        z = torch.from_numpy(np.asarray(latents)).permute(0, 4, 1, 2, 3)
        video = oracle.decode(z / oracle.config.scaling_factor * std + mean, return_dict=False)[0]
    return video.permute(0, 2, 3, 4, 1).numpy()


def random_video(batch, frames, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, frames, HEIGHT, WIDTH, 3)).astype(np.float32)


def random_latents(frames, channels=8, seed=1):
    return np.random.default_rng(seed).standard_normal((1, frames, HEIGHT // 32, WIDTH // 32, channels), np.float32)


def test_tiny_preset_is_the_oracle_config(converted):
    config, _ = converted
    assert config == VAE_PRESETS["ltx2_video_tiny"]
    assert (config.temporal_compression_ratio, config.spatial_compression_ratio) == (8, 32)


def test_released_preset_has_the_released_tensor_count():
    from sanawm_jax.models.ltx2_vae import abstract_vae_params

    # 184 tensors in the released vae/ folder, latents_mean and latents_std included.
    assert len(jax.tree.leaves(abstract_vae_params(VAE_PRESETS["ltx2_video"]))) == 184


@pytest.mark.parametrize("batch,frames", [(2, 1), (1, 17)], ids=["first_frame", "17_frames"])
def test_encode_matches_oracle(oracle, converted, batch, frames):
    config, params = converted
    video = random_video(batch, frames)
    expected = oracle_encode(oracle, video)
    actual = encode(params, video, config)
    assert actual.shape == expected.shape == (batch, 1 + (frames - 1) // 8, HEIGHT // 32, WIDTH // 32, 8)
    assert rel_l2(actual, expected) <= FP32_TOLERANCE


@pytest.fixture(scope="module")
def clip_latents_and_oracle_video(oracle):
    """Normalised latents of a 17-frame clip (3 latent frames) and the oracle's decode of them."""
    latents = random_latents(3)
    return latents, oracle_decode(oracle, latents)


def test_decode_matches_oracle(converted, clip_latents_and_oracle_video):
    config, params = converted
    latents, expected = clip_latents_and_oracle_video
    actual = decode(params, latents, config)
    assert actual.shape == expected.shape == (1, 17, HEIGHT, WIDTH, 3)
    assert rel_l2(actual, expected) <= FP32_TOLERANCE


def test_bfloat16_compute_decode_is_close_to_oracle(converted, clip_latents_and_oracle_video):
    config, params = converted
    latents, expected = clip_latents_and_oracle_video
    assert rel_l2(decode(params, latents, config.replace(dtype="bfloat16")), expected) <= BF16_TOLERANCE


def test_video_to_uint8_matches_diffusers_postprocessing():
    video = np.random.default_rng(5).uniform(-1.2, 1.2, (1, 3, 8, 8, 3)).astype(np.float32)
    frames = VideoProcessor().postprocess_video(torch.from_numpy(video).permute(0, 4, 1, 2, 3), output_type="pil")[0]
    np.testing.assert_array_equal(video_to_uint8(video)[0], np.stack([np.asarray(frame) for frame in frames]))


def test_weight_names_map_to_diffusers_keys():
    for path, key in [
        (("encoder", "down_blocks_2", "resnets_0", "conv1", "conv", "kernel"), "encoder.down_blocks.2.resnets.0.conv1.conv.weight"),
        (("decoder", "up_blocks_1", "conv_in", "norm3", "scale"), "decoder.up_blocks.1.conv_in.norm3.weight"),
        (("decoder", "up_blocks_1", "upsamplers_0", "conv", "conv", "bias"), "decoder.up_blocks.1.upsamplers.0.conv.conv.bias"),
        (("latents_std",), "latents_std"),
    ]:
        assert torch_key(path) == key


def test_converter_reads_pipeline_root(oracle, converted, tmp_path):
    oracle.save_pretrained(tmp_path / "pipeline" / "vae")
    config, params = convert_vae(tmp_path / "pipeline")
    expected_config, expected_params = converted
    assert config == expected_config
    chex.assert_trees_all_equal(params, expected_params)


def test_converter_reads_bfloat16_folder(oracle, converted, clip_latents_and_oracle_video, tmp_path):
    copy.deepcopy(oracle).to(torch.bfloat16).save_pretrained(tmp_path / "vae")
    config, params = convert_vae(tmp_path / "vae")
    assert config == converted[0]
    rounded = {key: value.to(torch.bfloat16).float() for key, value in oracle.state_dict().items()}
    expected = convert_vae_state_dict(TorchStateDictSource(rounded, "bf16-rounded oracle"), config)
    for actual, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert actual.dtype == np.float32
        np.testing.assert_array_equal(actual, want)  # widening BF16 to float32 is exact
    latents, expected = clip_latents_and_oracle_video
    assert rel_l2(decode(params, latents, config), expected) <= BF16_TOLERANCE


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mis-shaped"])
def test_converter_names_every_bad_key(oracle, converted, problem):
    config, _ = converted
    state = dict(oracle.state_dict())
    key = {
        "missing": "decoder.up_blocks.2.conv_in.norm3.bias",
        "unexpected": "decoder.up_blocks.0.conv_in.norm3.weight",
        "mis-shaped": "encoder.conv_in.conv.weight",
    }[problem]
    if problem == "missing":
        del state[key]
    elif problem == "unexpected":
        state[key] = torch.ones(32)
    else:
        state[key] = torch.ones(9, 48, 3, 3, 3)
    with pytest.raises(ConversionError, match=f"1 {problem.replace('mis-shaped', 'shape mismatch')}.*\n.*{key}"):
        convert_vae_state_dict(TorchStateDictSource(state, "edited oracle"), config)


def test_config_rejects_compression_ratio_that_blocks_do_not_produce():
    with pytest.raises(ValueError, match="spatial_compression_ratio=64"):
        VAEConfig.from_diffusers_config({**TINY_VAE_DIFFUSERS_CONFIG, "spatial_compression_ratio": 64})


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda p, c: encode(p, np.zeros((1, 1, HEIGHT, WIDTH, 4), np.float32), c), "3 channels"),
        (lambda p, c: encode(p, np.zeros((1, 8, HEIGHT, WIDTH, 3), np.float32), c), "frame count must be 8k\\+1"),
        (lambda p, c: encode(p, np.zeros((1, 1, 48, WIDTH, 3), np.float32), c), "multiples of 32"),
        (lambda p, c: decode(p, np.zeros((1, 2, 2, 3, 16), np.float32), c), "latents must have 8 channels"),
        (lambda p, c: decode_tiled(p, np.zeros((1, 9, 2, 3, 8), np.float32), c, 3, overlap=1), "overlap"),
    ],
    ids=["video_channels", "frame_count", "video_size", "latent_channels", "tile_overlap"],
)
def test_bad_inputs_raise_value_error(converted, call, message):
    config, params = converted
    with pytest.raises(ValueError, match=message):
        call(params, config)


def temporally_pointwise(decoder_params):
    """Zero the outer temporal taps of every 3x3x3 kernel: each pixel frame then depends only on its own latent."""

    def centre_tap_only(weight):
        weight = np.array(weight)
        if weight.ndim == 5 and weight.shape[0] == 3:
            weight[[0, 2]] = 0
        return weight

    return jax.tree.map(centre_tap_only, decoder_params)


def test_tiled_decode_equals_untiled_decode(converted):
    # With a temporally pointwise decoder, any tile sees exactly the inputs the untiled decode sees for the frames it
    # produces, so tiled == untiled up to float32 round-off (different conv shapes): 1e-5. A misplaced tile, a
    # cross-fade whose weights do not sum to one, or a lost frame would show up as an O(1) error.
    config, params = converted
    params = {**params, "decoder": temporally_pointwise(params["decoder"])}
    latents = random_latents(9)
    untiled = np.asarray(decode(params, latents, config))
    tiled = decode_tiled(params, latents, config, tile_latent_frames=3, overlap=2)  # 7 tiles, 8-frame cross-fades
    assert tiled.shape == untiled.shape == (1, 65, HEIGHT, WIDTH, 3)
    assert rel_l2(tiled, untiled) <= 1e-5
    as_uint8 = decode_tiled(params, latents, config, 3, 2, out=np.empty(untiled.shape, np.uint8))
    assert np.abs(as_uint8.astype(int) - video_to_uint8(untiled)).max() <= 1


def test_tiled_decode_reproduces_upstream_tiles_without_its_one_frame_lag(oracle, converted):
    # diffusers' framewise decode with 16/8-frame tiles is our tile_latent_frames=3, overlap=2. Its first 9 frames come
    # from the first tile alone and match ours. It keeps one more frame of the first tile than of the others, so from
    # frame 9 on its output lags the true frame positions by one: our frames 16..31 (past the first cross-fade, before
    # its shortened tail tiles) equal its frames 17..32, cross-fades included.
    config, params = converted
    latents = random_latents(7)
    mean, std = oracle_statistics(oracle)
    tiler = copy.deepcopy(oracle)
    tiler.enable_tiling(tile_sample_min_num_frames=16, tile_sample_stride_num_frames=8)
    tiler.use_framewise_decoding = True
    with torch.no_grad():
        z = torch.from_numpy(latents).permute(0, 4, 1, 2, 3) / oracle.config.scaling_factor * std + mean
        upstream = tiler.decode(z, return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    ours = decode_tiled(params, latents, config, tile_latent_frames=3, overlap=2)
    assert rel_l2(ours[:, :9], upstream[:, :9]) <= FP32_TOLERANCE
    assert rel_l2(ours[:, 16:32], upstream[:, 17:33]) <= FP32_TOLERANCE
    assert rel_l2(ours[:, 16:32], upstream[:, 16:32]) > 0.1  # the lag is real, not a coincidence of the data
