"""The Flax DiT equals the diffusers oracle (`SanaWMTransformer3DModel`) with converted random weights.

The oracle runs in float64 with upstream's bf16 rounding of softmax inputs patched out (`Tensor.bfloat16` made the
identity while it runs), so the comparison measures our float32 numerics only: relative L2 <= 1e-5 is float32 round-off
accumulated over 4 blocks. bf16 compute is compared to the same oracle at 3e-2 (bf16 has an 8-bit mantissa, ~4e-3 per
op, accumulated through the stack).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.sana_wm.checkpoint import convert_state_dict
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer


def random_rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def camera_inputs(rng, batch, frames, height, width):
    """Relative c2w (frame 0 = identity) + latent-grid intrinsics (B, T, 20), and a Plücker-like (B, T, H, W, 48)."""
    conditions = np.zeros((batch, frames, 20))
    for b in range(batch):
        for t in range(frames):
            pose = np.eye(4)
            if t:
                pose[:3, :3] = random_rotation(rng) if rng.random() < 0.5 else np.eye(3)
                pose[:3, 3] = rng.standard_normal(3) * 0.5
            conditions[b, t, :16] = pose.reshape(-1)
            conditions[b, t, 16:] = [width * 0.9, height * 1.1, width / 2 - 0.3, height / 2 + 0.2]
    plucker = rng.standard_normal((batch, frames, height, width, 48))
    return conditions.astype(np.float32), plucker.astype(np.float32)


def run_oracle(oracle, latents, timesteps, text, text_mask, conditions=None, plucker=None, frame_mask=None):
    as_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float64))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "bfloat16", lambda self: self)
        out = oracle(
            hidden_states=as_t(latents).permute(0, 4, 1, 2, 3),
            timestep=as_t(timesteps)[:, None, :],
            encoder_hidden_states=as_t(text)[:, None],
            encoder_attention_mask=torch.from_numpy(np.asarray(text_mask)),
            camera_conditions=as_t(conditions),
            chunk_plucker=None if plucker is None else as_t(plucker).permute(0, 4, 1, 2, 3),
            frame_valid_mask=as_t(frame_mask),
        ).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def converted(tiny_oracle):
    oracle, diffusers_config = tiny_oracle
    config = SanaWMConfig.from_diffusers_config(diffusers_config)
    params = convert_state_dict(TorchStateDictSource(oracle.state_dict(), "tiny oracle"), config, log=lambda *_: None)
    return oracle, config, params


def relative_l2(ours, reference):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


def compare(converted, *, batch=1, frames=2, height=3, width=4, camera=True, text_lengths=(5,), frame_mask=None,
            dtype="float32", seed=0):
    oracle, config, params = converted
    config = config.replace(dtype=dtype)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, frames, height, width, config.in_channels)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, (batch, frames)).astype(np.float32)
    timesteps[:, 0] = 0.0
    text_len = max(text_lengths)
    text = rng.standard_normal((batch, text_len, config.caption_channels)).astype(np.float32)
    text_mask = np.zeros((batch, text_len), np.int64)
    for b in range(batch):
        text_mask[b, : text_lengths[b % len(text_lengths)]] = 1
    conditions, plucker = camera_inputs(rng, batch, frames, height, width) if camera else (None, None)
    expected = run_oracle(oracle, latents, timesteps, text, text_mask, conditions, plucker, frame_mask)
    ours = jax.jit(SanaWMTransformer(config).apply)(
        {"params": params}, latents, timesteps, text, text_mask,
        camera_conditions=conditions, chunk_plucker=plucker, frame_valid_mask=frame_mask,
    )
    assert ours.shape == expected.shape and ours.dtype == config.compute_dtype
    return relative_l2(ours, expected)


def test_converted_tree_uses_both_block_kinds(converted):
    _, config, params = converted
    kinds = {config.is_softmax_block(i) for i in range(config.num_layers)}
    assert kinds == {True, False}
    assert "conv_k" in params["blocks_0"]["attn"] and "conv_k" not in params["blocks_3"]["attn"]


# One frame count in the fast tier; the single-frame and five-frame cases compile two more programs.
@pytest.mark.parametrize("frames", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(5, marks=pytest.mark.slow)])
def test_parity_with_camera(converted, frames):
    assert compare(converted, frames=frames) <= 1e-5


def test_parity_without_camera(converted):
    assert compare(converted, frames=3, camera=False) <= 1e-5


def test_parity_cfg_batch_with_different_text_masks(converted):
    assert compare(converted, batch=2, frames=3, text_lengths=(5, 2)) <= 1e-5


@pytest.mark.slow  # the 3x4 grid of the other cases is already non-square
def test_parity_non_square_grid(converted):
    assert compare(converted, frames=2, height=2, width=5) <= 1e-5


@pytest.mark.slow
def test_parity_padded_trailing_frames(converted):
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    assert compare(converted, batch=2, frames=5, frame_mask=mask) <= 1e-5


def test_bf16_compute_close_to_fp32_oracle(converted):
    assert compare(converted, frames=3, dtype="bfloat16") <= 3e-2
