"""Time one stage-1 denoising step on this machine: our jit-compiled `denoise_step` against diffusers in eager mode.

A step is what the sampling loop does once: the DiT on the CFG batch [uncond; cond] (camera tensors duplicated), the
guidance mix and the per-token Euler update. Both sides run float32 on the CPU with random weights (the timing does
not depend on their values). The two sides run interleaved; each side's first call (JAX: compilation) is reported
apart from the steady-state median. The last line is `diffusers_over_jax=R spread=S` for the last config given: R
the median of the per-repeat ratios diffusers / jax, S their relative spread (max - min) / median.

    python bench/sample_step.py [--configs tiny small] [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaWMTransformer3DModel
from timing import interleaved, machine_state, report_machine

from sanawm_jax.camera import action_string_to_c2w, prepare_camera
from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.diffusion.sampler import denoise_step, guidance_conditioning
from sanawm_jax.diffusion.scheduler import flow_sigmas, flow_timesteps
from sanawm_jax.models.sana_wm.checkpoint import convert_state_dict
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer

# diffusers model arguments and the latent video (frames, height, width) of each benchmark case.
CASES = {
    "tiny": dict(
        model=dict(in_channels=8, num_layers=4, hidden_size=64, num_attention_heads=4, linear_head_dim=16,
                   caption_channels=32, chunk_plucker_post_attn_blocks=4),
        latent=(3, 2, 3), text_len=8,
    ),
    "small": dict(
        model=dict(in_channels=128, num_layers=8, hidden_size=256, num_attention_heads=4, linear_head_dim=64,
                   caption_channels=2304, chunk_plucker_post_attn_blocks=8),
        latent=(5, 11, 20), text_len=64,
    ),
}
GUIDANCE_SCALE, NUM_STEPS, SHIFT, STEP_INDEX = 5.0, 60, 8.0, 10


def make_inputs(case, rng):
    """Channels-last numpy inputs of one video (batch 1): latents, text, mask, camera tensors."""
    frames, height, width = case["latent"]
    model = case["model"]
    c2w = action_string_to_c2w(f"w-{8 * (frames - 1) // 2},wd-{8 * (frames - 1) - 8 * (frames - 1) // 2}")
    c2w = c2w[: 8 * (frames - 1) + 1]
    intrinsics = np.tile([0.8 * 32 * width, 0.8 * 32 * width, 16 * width, 16 * height], (c2w.shape[0], 1))
    conditions, plucker = prepare_camera(c2w, intrinsics, (32 * height, 32 * width))
    text_mask = np.ones((1, case["text_len"]), np.int64)
    text_mask[:, case["text_len"] // 2:] = 0
    return dict(
        latents=rng.standard_normal((1, frames, height, width, model["in_channels"])).astype(np.float32),
        text=rng.standard_normal((1, case["text_len"], model["caption_channels"])).astype(np.float32),
        text_mask=text_mask,
        camera_conditions=np.array(conditions)[None],
        chunk_plucker=np.array(plucker)[None],
    )




def jax_step(oracle, case, inputs):
    config = SanaWMConfig.from_diffusers_config(case["model"])
    params = jax.device_put(
        convert_state_dict(TorchStateDictSource(oracle.state_dict(), "benchmark"), config, log=lambda *_: None)
    )
    model = SanaWMTransformer(config)
    sigmas = flow_sigmas(NUM_STEPS, SHIFT)
    timestep = jnp.float32(flow_timesteps(sigmas)[STEP_INDEX])
    conditioning = guidance_conditioning(
        inputs["text"], inputs["text_mask"], inputs["text"], inputs["text_mask"],
        inputs["camera_conditions"], inputs["chunk_plucker"], use_guidance=True,
    )
    latents = jnp.asarray(inputs["latents"])
    sigmas, guidance = jnp.asarray(sigmas), jnp.float32(GUIDANCE_SCALE)

    def run():
        denoise_step(model, params, latents, timestep, sigmas, guidance, conditioning, True).block_until_ready()

    return run


def torch_step(oracle, inputs):
    """The loop body of `SanaWMPipeline.__call__` for one step, on (B, C, T, H, W) tensors."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(NUM_STEPS)
    t = scheduler.timesteps[STEP_INDEX]
    latents = torch.from_numpy(inputs["latents"]).permute(0, 4, 1, 2, 3)
    b, c, f, h, w = latents.shape
    twice = lambda a: torch.cat([a, a])
    text = twice(torch.from_numpy(inputs["text"])[:, None])
    mask = twice(torch.from_numpy(inputs["text_mask"]))
    conditions = twice(torch.from_numpy(inputs["camera_conditions"]))
    plucker = twice(torch.from_numpy(inputs["chunk_plucker"]).permute(0, 4, 1, 2, 3))
    condition_mask = torch.zeros_like(latents)
    condition_mask[:, :, :1] = 1.0

    @torch.no_grad()
    def run():
        timestep = torch.min(t.expand(condition_mask.shape).float(), (1.0 - condition_mask) * 1000.0)
        velocity = oracle(twice(latents), twice(timestep[:, :1, :, 0, 0]), text, encoder_attention_mask=mask,
                          camera_conditions=conditions, chunk_plucker=plucker, return_dict=False)[0]
        uncond, cond = velocity.chunk(2)
        velocity = uncond + GUIDANCE_SCALE * (cond - uncond)
        scheduler.step(-velocity.reshape(b, c, -1).transpose(1, 2), t, latents.reshape(b, c, -1).transpose(1, 2),
                       per_token_timesteps=timestep.reshape(b, c, -1)[:, 0], return_dict=False)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    before = machine_state()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, CFG batch 2, median of {args.repeats} interleaved repeats")
    print(f"{'config':<8}{'tokens':>8}{'jax compile s':>15}{'jax step ms':>13}{'torch step ms':>15}"
          f"{'torch/jax':>11}{'spread':>8}")
    for name in args.configs:
        case = CASES[name]
        torch.manual_seed(0)
        oracle = SanaWMTransformer3DModel(**case["model"]).eval()
        inputs = make_inputs(case, np.random.default_rng(0))
        timing = interleaved({"jax": jax_step(oracle, case, inputs), "diffusers": torch_step(oracle, inputs)},
                             args.repeats)
        ratio, spread = timing.ratio("diffusers", "jax")
        tokens = int(np.prod(case["latent"]))
        print(f"{name:<8}{tokens:>8}{timing.first['jax']:>15.1f}{1e3 * timing.median('jax'):>13.1f}"
              f"{1e3 * timing.median('diffusers'):>15.1f}{ratio:>11.2f}{spread:>8.2f}")
    report_machine(before)
    print(f"diffusers_over_jax={ratio:.2f} spread={spread:.2f}")

if __name__ == "__main__":
    main()
