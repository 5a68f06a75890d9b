"""The embedded demo weights: rebuilt bit for bit from fixed seeds (slow), and the bundled file fits the demo's
configs and the size limit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sanawm_jax import demo, demo_weights
from sanawm_jax.models.ltx2_vae import VAE_PRESETS


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_weights_rebuild_bit_for_bit(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    demo_weights.build(first, demo_weights.SMALL)
    demo_weights.build(second, demo_weights.SMALL)
    names = (demo.DEMO_WEIGHTS, demo.EXAMPLE_IMAGE, demo.EXAMPLE_INTRINSICS)
    assert [file_digest(first / name) for name in names] == [file_digest(second / name) for name in names]
    config, params, vae_config, vae_params = demo.load_trained_weights(first / demo.DEMO_WEIGHTS)
    assert config == demo.demo_config() and vae_config == VAE_PRESETS["ltx2_video_tiny"]
    # Trained, not the initialisation: the latent statistics were measured on the encoded clips.
    assert not np.allclose(np.asarray(vae_params["latents_std"]), 1.0)


def test_bundled_demo_weights_fit_the_demo_configs_and_size_limit():
    path = demo.asset_path(demo.DEMO_WEIGHTS)
    assert path.stat().st_size <= 20 * 2**20
    config, params, vae_config, _ = demo.load_trained_weights()
    assert config == demo.demo_config() and vae_config == VAE_PRESETS["ltx2_video_tiny"]
    description = demo.example_description()
    assert description["synthetic_clip"]["seed"] != demo_weights.RECIPE["data_seed"]  # a held-out scene
