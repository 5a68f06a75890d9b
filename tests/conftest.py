"""Shared fixtures, built once per session: small PyTorch oracles with randomised weights, the embedded training data,
and the results of the checks that need several (fake CPU) devices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sanawm_jax.models.ltx2_vae import VAE_PRESETS
from sanawm_jax.models.sana_wm.config import PRESETS

# Our tiny preset, spelled as diffusers `SanaWMTransformer3DModel` arguments.
TINY_DIFFUSERS_CONFIG = {
    name: getattr(PRESETS["sana_wm_tiny"], name)
    for name in ("in_channels", "num_layers", "hidden_size", "num_attention_heads", "linear_head_dim",
                 "caption_channels", "chunk_plucker_post_attn_blocks")
}
# The `ltx2_video_tiny` VAE preset, spelled as diffusers `AutoencoderKLLTX2Video` arguments (compression ratios given
# explicitly: diffusers' derivation from the block flags says 64/16).
TINY_VAE_DIFFUSERS_CONFIG = {
    **{
        name: getattr(VAE_PRESETS["ltx2_video_tiny"], name)
        for name in ("latent_channels", "block_out_channels", "decoder_block_out_channels", "layers_per_block",
                     "decoder_layers_per_block", "upsample_factor", "upsample_residual", "decoder_causal")
    },
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}


def randomize_(module, seed: int, scale: float = 0.05):
    """Give every parameter and float buffer of a torch module non-zero random values (zero inits included),
    keeping gate parameters in a realistic range."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            if name.endswith("A_log"):
                param.copy_(torch.log(torch.rand(param.shape, generator=generator) * 2 + 0.5))
            elif name.endswith("dt_bias"):
                param.copy_(noise.float() * 0.5 - 2.0)
            elif name.endswith("norm.weight") or name.endswith("norm_cam.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("scale_shift_table"):
                param.copy_(0.3 * noise)
            else:
                fan_in = max(1, int(np.prod(param.shape[1:])))
                param.copy_(noise * min(scale * 8, 1.0 / np.sqrt(fan_in)))
    return module


def tiny_vae_oracle(*, stats_seed: int, init_seed: int = 0, weight_seed: int | None = None, mean_scale: float = 0.5,
                    **config):
    """A diffusers `AutoencoderKLLTX2Video` of the tiny preset (config entries override it), in eval mode, with
    non-trivial latent statistics (mean ~ mean_scale * N(0, 1), std in [0.5, 1.5)) and, given weight_seed, every
    weight non-zero random."""
    import torch
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(init_seed)
    vae = AutoencoderKLLTX2Video(**{**TINY_VAE_DIFFUSERS_CONFIG, **config}).eval()
    if weight_seed is not None:
        randomize_(vae, seed=weight_seed)
    generator = torch.Generator().manual_seed(stats_seed)
    with torch.no_grad():
        vae.latents_mean.copy_(mean_scale * torch.randn(vae.latents_mean.shape, generator=generator))
        vae.latents_std.copy_(0.5 + torch.rand(vae.latents_std.shape, generator=generator))
    return vae


@pytest.fixture(scope="session")
def tiny_oracle():
    """A randomised tiny diffusers SanaWMTransformer3DModel (float64, eval mode) and its config dict."""
    import torch
    from diffusers import SanaWMTransformer3DModel

    torch.manual_seed(0)
    model = SanaWMTransformer3DModel(**TINY_DIFFUSERS_CONFIG).eval()
    randomize_(model, seed=1)
    return model.double(), dict(TINY_DIFFUSERS_CONFIG)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`-n 2`, default `--dist load`): the test files that read the multi-device checks run on one
    worker, so each tier's check process starts once; every other test is scheduled on its own. Another `--dist`
    keeps xdist's own scheduler."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    tests = Path(__file__).parent
    together = {path.name for path in tests.glob("test_*.py") if "multi_device" in path.read_text()}

    class MultiDeviceFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "multi_device" if nodeid.split("::")[0].rsplit("/", 1)[-1] in together else nodeid

    return MultiDeviceFilesTogether(config, log)


@pytest.fixture(scope="session")
def demo_train_data(tmp_path_factory):
    """The embedded default data of train.py (synthetic clips, tiny demo VAE latents and text embeddings), built
    once per session: DIR/clips and DIR/text."""
    from sanawm_jax.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("demo_train") / "data"
    build_demo_dataset(root)
    return root


def multi_device_results(tier: str, tmp_path_factory, demo_train_data):
    from tests.multi_device import run_checks

    results = run_checks(tier, tmp_path_factory.mktemp(f"multi_device_{tier}"), demo_train_data)

    def result(name: str) -> dict:
        if "error" in results[name]:
            pytest.fail(f"multi-device check {name} raised:\n{results[name]['error']}")
        return results[name]["result"]

    return result


@pytest.fixture(scope="session")
def multi_device(tmp_path_factory, demo_train_data):
    """name -> what the fast check of that name in tests/multi_device.py returned; every fast check runs in one
    subprocess with fake CPU devices, started the first time a test asks. A check that raised fails the test with its
    traceback."""
    return multi_device_results("fast", tmp_path_factory, demo_train_data)


@pytest.fixture(scope="session")
def multi_device_slow(tmp_path_factory, demo_train_data):
    """As `multi_device`, for the slow checks (their own subprocess)."""
    return multi_device_results("slow", tmp_path_factory, demo_train_data)
