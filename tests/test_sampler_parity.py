"""Our stage-1 sampler equals diffusers' `SanaWMPipeline` denoising loop (output_type="latent").

Both run the same randomised tiny DiT in float32 (ours through our converter), on the same first-frame latent (encoded
here by a tiny randomised `AutoencoderKLLTX2Video` exactly as the pipeline encodes its image), the same starting noise
(the pipeline draws it from a seeded torch generator; the test draws the same values and hands them to ours), the same
text states and the same camera tensors. Upstream rounds softmax inputs to bf16 in float32 mode; `Tensor.bfloat16` is
patched to the identity while the pipeline runs, so both sides are plain float32. Tolerance: relative L2 1e-4 —
float32 round-off of the DiT (~1e-6 per call) carried through a few Euler steps and the CFG difference
v_cond − v_uncond amplified by the guidance scale (measured about 2e-6).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SanaWMPipeline,
)
from diffusers.pipelines.sana_wm.cam_utils import prepare_camera

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.diffusion import SamplerConfig, initial_noise, sample
from sanawm_jax.diffusion.sampler import denoise_step, guidance_conditioning
from sanawm_jax.diffusion.scheduler import flow_sigmas
from sanawm_jax.models.sana_wm.checkpoint import convert_state_dict
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer
from tests.conftest import tiny_vae_oracle

HEIGHT, WIDTH, NUM_FRAMES = 64, 96, 17  # -> 3 latent frames of 2x3 tokens
VAE_STRIDE = (8, 32, 32)
TEXT_LEN, NEGATIVE_LEN = 6, 3
NUM_STEPS, SHIFT, NOISE_SEED = 3, 8.0, 123
INTRINSICS = np.array([70.0, 75.0, 47.5, 31.0], np.float32)  # fx, fy, cx, cy of the 96x64 image


def tiny_vae():
    """A randomised LTX-2 VAE with the released strides (t8/h32/w32), 8 latent channels and non-trivial latent stats."""
    return tiny_vae_oracle(init_seed=3, stats_seed=4, mean_scale=0.1, scaling_factor=0.7)


def camera_trajectory():
    """(17, 4, 4) c2w: the camera moves forward and right while turning right."""
    c2w = np.tile(np.eye(4, dtype=np.float32), (NUM_FRAMES, 1, 1))
    for i in range(NUM_FRAMES):
        angle = 0.03 * i
        c2w[i, :3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
        c2w[i, :3, 3] = [0.02 * i, -0.01 * i, 0.05 * i]
    return c2w


def encode_first_frame(pipe, image):
    """The pipeline's first-frame latent: posterior mode of the image, normalised by the VAE's latent stats."""
    intrinsics = np.tile(INTRINSICS, (NUM_FRAMES, 1))
    pixels, intrinsics = pipe.image_processor.preprocess_with_intrinsics(image, intrinsics, HEIGHT, WIDTH)
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    z = (z - mean) * vae.config.scaling_factor / std
    return z.permute(0, 2, 3, 4, 1).numpy(), intrinsics


@pytest.fixture(scope="module")
def setup(tiny_oracle):
    oracle64, diffusers_config = tiny_oracle
    transformer = copy.deepcopy(oracle64).float()
    config = SanaWMConfig.from_diffusers_config(diffusers_config)
    source = TorchStateDictSource(transformer.state_dict(), "tiny float32")
    params = convert_state_dict(source, config, log=lambda *_: None)
    pipe = SanaWMPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
    )
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(5)
    image = PIL.Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))
    c2w = camera_trajectory()
    first_frame_latent, intrinsics = encode_first_frame(pipe, image)
    camera = prepare_camera(c2w, intrinsics, target_size=(HEIGHT, WIDTH), vae_stride=VAE_STRIDE)
    text = rng.standard_normal((1, TEXT_LEN, config.caption_channels)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 1, 1, 0]])
    negative_text = rng.standard_normal((1, NEGATIVE_LEN, config.caption_channels)).astype(np.float32)
    negative_text_mask = np.array([[1, 1, 0]])
    latent_shape = (1, config.in_channels, (NUM_FRAMES - 1) // 8 + 1, HEIGHT // 32, WIDTH // 32)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float32)
    return dict(
        pipe=pipe, image=image, c2w=c2w, model=SanaWMTransformer(config), params=params,
        ours=dict(
            first_frame_latent=first_frame_latent,
            noise=noise.permute(0, 2, 3, 4, 1).numpy(),
            text=text, text_mask=text_mask,
            negative_text=negative_text, negative_text_mask=negative_text_mask,
            camera_conditions=camera["raymap"].numpy()[None],
            chunk_plucker=camera["chunk_plucker"].permute(1, 2, 3, 0).numpy()[None],
        ),
    )


def run_pipeline(setup, guidance_scale):
    """Final latents (1, T, H, W, C) of the pipeline; its negative text is ours zero-padded to the prompt's length."""
    ours = setup["ours"]
    pad = TEXT_LEN - NEGATIVE_LEN
    negative_text = np.pad(ours["negative_text"], ((0, 0), (0, pad), (0, 0)))
    negative_text_mask = np.pad(ours["negative_text_mask"], ((0, 0), (0, pad)))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "bfloat16", lambda self: self)
        latents = setup["pipe"](
            setup["image"], "",
            c2w=setup["c2w"], intrinsics=INTRINSICS, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
            num_inference_steps=NUM_STEPS, guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(NOISE_SEED),
            prompt_embeds=torch.from_numpy(ours["text"])[:, None],
            prompt_attention_mask=torch.from_numpy(ours["text_mask"]),
            negative_prompt_embeds=torch.from_numpy(negative_text)[:, None],
            negative_prompt_attention_mask=torch.from_numpy(negative_text_mask),
            output_type="latent", return_dict=False,
        )[0]
    return latents.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def pipeline_latents(setup):
    return {guidance: run_pipeline(setup, guidance) for guidance in (1.0, 3.0)}


def run_ours(setup, guidance_scale, fused):
    config = SamplerConfig(num_steps=NUM_STEPS, guidance_scale=guidance_scale, shift=SHIFT)
    return sample(setup["model"], setup["params"], **setup["ours"], config=config, fused=fused, progress=False)


def relative_l2(ours, reference):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


# Each of CFG on/off and fused/per-step once: the fused loop runs the same compiled step body as the per-step loop.
@pytest.mark.parametrize("guidance_scale,fused", [(1.0, True), (3.0, False)], ids=["no_cfg_fused", "cfg_per_step"])
def test_final_latents_equal_pipeline(setup, pipeline_latents, guidance_scale, fused):
    ours = run_ours(setup, guidance_scale, fused)
    expected = pipeline_latents[guidance_scale]
    assert ours.shape == expected.shape == (1, 3, 2, 3, 8) and ours.dtype == jnp.float32
    assert relative_l2(ours, expected) <= 1e-4


def test_first_frame_stays_the_encoded_image(setup, pipeline_latents):
    ours = run_ours(setup, 3.0, fused=False)
    np.testing.assert_array_equal(ours[:, 0], setup["ours"]["first_frame_latent"][:, 0])
    np.testing.assert_array_equal(pipeline_latents[3.0][:, 0], setup["ours"]["first_frame_latent"][:, 0])


def test_one_compiled_step_serves_every_timestep_and_guidance_scale(setup):
    ours = setup["ours"]
    conditioning = guidance_conditioning(
        ours["text"], ours["text_mask"], ours["negative_text"], ours["negative_text_mask"],
        ours["camera_conditions"], ours["chunk_plucker"], use_guidance=True,
    )
    sigmas = jnp.asarray(flow_sigmas(NUM_STEPS, SHIFT))

    def program(timestep, guidance_scale):
        return denoise_step.lower(
            setup["model"], setup["params"], jnp.asarray(ours["noise"]), jnp.float32(timestep), sigmas,
            jnp.float32(guidance_scale), conditioning, use_guidance=True,
        ).as_text()

    assert program(1000.0, 3.0) == program(120.0, 5.0)


def test_noise_is_deterministic_given_the_key():
    first = jnp.zeros((1, 1, 2, 3, 8))
    a, b = initial_noise(jax.random.key(7), first, 3), initial_noise(jax.random.key(7), first, 3)
    assert a.shape == (1, 3, 2, 3, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, initial_noise(jax.random.key(8), first, 3))


def test_fused_sampling_reports_each_step(setup, capsys):
    config = SamplerConfig(num_steps=NUM_STEPS, guidance_scale=1.0, shift=SHIFT)
    latents = sample(setup["model"], setup["params"], **setup["ours"], config=config, fused=True, progress=True)
    latents.block_until_ready()
    jax.effects_barrier()
    assert f"denoising step {NUM_STEPS}/{NUM_STEPS}" in capsys.readouterr().err


def test_guidance_without_negative_text_is_rejected(setup):
    inputs = dict(setup["ours"], negative_text=None, negative_text_mask=None)
    with pytest.raises(ValueError, match="negative_text"):
        sample(setup["model"], setup["params"], **inputs, config=SamplerConfig(num_steps=1), progress=False)
