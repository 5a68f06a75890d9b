"""Pieces behind the embedded demo weights and the ablations: the camera-branch switch, the autoencoder objective
and its crops, and the camera-following measurement against exact synthetic geometry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanawm_jax import demo
from sanawm_jax.data import camera_following
from sanawm_jax.data.synthetic import generate_clip, render, to_uint8
from sanawm_jax.models.ltx2_vae import VAE_PRESETS, VideoAutoencoder, init_vae_params
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs
from sanawm_jax.training.autoencoder import autoencoder_loss, initial_params, random_crops


def test_camera_branches_off_makes_the_model_ignore_its_camera_inputs():
    # One GDN and one softmax block: both kinds of camera branch.
    config = PRESETS["sana_wm_tiny"].replace(num_layers=2, softmax_every_n=2, camera_branches=False)
    params = demo.random_params(abstract_params(config), np.random.default_rng(0))
    inputs = example_inputs(config, frames=2, height=2, width=3)
    rng = np.random.default_rng(1)
    inputs["latents"] = jnp.asarray(rng.standard_normal(inputs["latents"].shape), jnp.float32)
    inputs["chunk_plucker"] = jnp.asarray(rng.standard_normal(inputs["chunk_plucker"].shape), jnp.float32)
    inputs["camera_conditions"] = inputs["camera_conditions"].at[0, 1, 3].set(0.5)  # the second camera moved in x
    model = SanaWMTransformer(config)
    no_camera = {name: value for name, value in inputs.items() if name not in ("camera_conditions", "chunk_plucker")}
    without = model.apply({"params": params}, **no_camera)
    switched_off = model.apply({"params": params}, **inputs)
    on = SanaWMTransformer(config.replace(camera_branches=True)).apply({"params": params}, **inputs)
    np.testing.assert_array_equal(switched_off, without)  # the same computation, bit for bit
    assert float(jnp.abs(on - without).max()) > 1e-3  # the inputs do matter when the branches are on


@pytest.mark.slow
def test_autoencoder_loss_leaves_the_latent_statistics_untrained_and_weighs_the_kl_term():
    config = VAE_PRESETS["ltx2_video_tiny"]
    params = init_vae_params(config, jax.random.key(0))
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 1, 64, 64, 3)), jnp.float32)
    key = jax.random.key(1)
    (loss, parts), grads = jax.value_and_grad(autoencoder_loss, has_aux=True)(params, video, key, config, 0.5)
    assert not np.any(np.asarray(grads["latents_mean"])) and not np.any(np.asarray(grads["latents_std"]))
    mean, log_variance = VideoAutoencoder(config).apply({"params": params}, video, method="posterior")
    # KL(N(m, s^2) || N(0, 1)) per element, the variance shared by the channels of a position (clamped as diffusers).
    log_variance = np.clip(np.asarray(log_variance, np.float64), -30, 20)[..., None]
    kl = 0.5 * np.mean(np.asarray(mean, np.float64) ** 2 + np.exp(log_variance) - 1 - log_variance)
    np.testing.assert_allclose(float(parts["kl"]), kl, rtol=1e-5)  # float32 vs float64 sums of a few hundred terms
    np.testing.assert_allclose(float(loss), float(parts["mse"]) + 0.5 * kl, rtol=1e-5)


def test_autoencoder_training_starts_from_a_grey_decoder_with_identity_resnets():
    config = VAE_PRESETS["ltx2_video_tiny"]
    params = initial_params(config, seed=0)
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 2, 2, config.latent_channels)), jnp.float32)
    model = VideoAutoencoder(config)
    video, state = model.apply({"params": params}, latents, method="decode_raw", capture_intermediates=True)
    np.testing.assert_array_equal(video, 0.0)  # the output convolution is zero: a flat grey frame
    mid = state["intermediates"]["decoder"]["mid_block"]
    conv_in = state["intermediates"]["decoder"]["conv_in"]["__call__"][0]
    np.testing.assert_array_equal(mid["__call__"][0], conv_in)  # its resnet passes its input through
    # The rest keeps its random initialisation: the resnets' first convolutions, the encoder's.
    assert float(jnp.abs(params["decoder"]["mid_block"]["resnets_0"]["conv1"]["conv"]["kernel"]).min()) > 0
    assert float(jnp.abs(params["encoder"]["conv_out"]["conv"]["kernel"]).std()) > 0


def test_random_crops_are_windows_of_the_videos():
    videos = np.arange(2 * 17 * 8 * 10 * 3, dtype=np.float32).reshape(2, 17, 8, 10, 3)
    crops = random_crops(videos, np.random.default_rng(0), 5, 9, (4, 6))
    assert crops.shape == (5, 9, 4, 6, 3)
    for crop in crops:
        clip, t, y, x = np.argwhere(videos == crop[0, 0, 0, 0])[0][:4]
        np.testing.assert_array_equal(crop, videos[clip, t:t + 9, y:y + 4, x:x + 6])
    with pytest.raises(ValueError, match="do not fit"):
        random_crops(videos, np.random.default_rng(0), 1, 25, (4, 6))


def test_camera_following_is_zero_on_the_truth_and_finds_a_known_offset():
    clip = generate_clip(8, 0, 17, *demo.TARGET_SIZE)  # the demo's frame size, at which the ablations measure
    truth = to_uint8(clip.render().rgb)
    errors = camera_following.camera_following_error(clip, truth, (16,))
    np.testing.assert_array_equal(errors["yaw_deg"], 0)
    np.testing.assert_array_equal(errors["forward_m"], 0)
    # Frame 16 seen from a camera turned 4.5 degrees and 0.3 m further forward: both offsets are grid points.
    moved = camera_following.candidate_poses(clip.c2w[16], [4.5], [0.3])
    frame = to_uint8(render(clip.scene, moved, clip.intrinsics[:1], *demo.TARGET_SIZE).rgb[0])
    yaw, forward = camera_following.recover_offsets(clip, frame, 16)
    assert yaw == 4.5 and forward == pytest.approx(0.3, abs=1e-9)
