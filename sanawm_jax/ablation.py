"""Ablations of the tiny model on synthetic scenes, measured against exact ground truth (`notebooks/ablations.ipynb`).

A variant is a set of DiT config overrides (`VARIANTS`); each is trained on the same cached latents for several
seeds (`training.in_memory`), then sampled from the first frame of held-out clips along their true camera paths
and compared with the clips' rendered frames:

    config, params, losses = train_variant(VARIANTS["camera_off"], examples, null_text, train_config)
    metrics = evaluate_clip(world.with_dit(config, params), clip, sampler, seed=0, following_frames=(8, 16))

Pixel metrics (PSNR, SSIM per frame) compare the decoded video (through the trained VAE) with the rendered frames;
the camera-following error (`data.camera_following`) recovers each frame's camera from the scene's geometry.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sanawm_jax.data.camera_following import camera_following_error
from sanawm_jax.data.evaluation import psnr_per_frame, ssim_per_frame
from sanawm_jax.data.synthetic_set import RenderedClip
from sanawm_jax.diffusion.scheduler import SamplerConfig
from sanawm_jax.generate import WorldModel
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer
from sanawm_jax.training.config import TrainConfig
from sanawm_jax.training.in_memory import train_in_memory

VARIANTS = {
    "full": {},  # GDN blocks with softmax every 4th, both camera branches
    "all_softmax": {"softmax_every_n": 1},  # every block softmax attention: no GDN
    "camera_off": {"camera_branches": False},  # neither the UCPE camera branch nor the Plücker term
}


def train_variant(base_config, overrides: dict, examples: dict, null_text, train_config: TrainConfig):
    """(config, params, per-step losses) of `base_config.replace(**overrides)` trained on examples."""
    config = base_config.replace(**overrides)
    params, losses = train_in_memory(config, train_config, examples, null_text)
    return config, params, losses


def with_dit(world: WorldModel, config, params) -> WorldModel:
    """`world` with another DiT (config and params); VAE and text encoder shared."""
    return dataclasses.replace(world, model=SanaWMTransformer(config), params=params)


def evaluate_clip(world: WorldModel, rendered: RenderedClip, sampler: SamplerConfig, seed: int,
                  following_frames) -> dict[str, np.ndarray]:
    """Sample from the clip's first frame along its camera path with its caption; returns "psnr" (F,) dB and
    "ssim" (F,) against the rendered frames, "yaw_deg", "forward_m" (len(following_frames),) camera-following
    errors, and the generated "video" (F, H, W, 3) uint8."""
    clip = rendered.clip
    world = dataclasses.replace(world, target_size=(clip.height, clip.width))
    text = world.encode_prompt(clip.scene.caption, cfg=sampler.uses_guidance)
    result = world.generate(rendered.model_video[0], clip.c2w, clip.intrinsics, text, sampler, seed=seed,
                            progress=False)
    following = camera_following_error(clip, result.video, following_frames)
    return {"psnr": psnr_per_frame(result.video, rendered.frames),
            "ssim": ssim_per_frame(result.video, rendered.frames), **following, "video": result.video}


def first_frame_baseline(rendered: RenderedClip) -> dict[str, np.ndarray]:
    """PSNR / SSIM (F,) of holding the true first frame still: the score of a video that does not move at all."""
    still = np.repeat(rendered.frames[:1], len(rendered.frames), axis=0)
    return {"psnr": psnr_per_frame(still, rendered.frames), "ssim": ssim_per_frame(still, rendered.frames)}


def mean_and_spread(values_per_seed) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds (axis 0) of per-seed arrays (ddof 1 with two or more seeds)."""
    values = np.asarray(values_per_seed, np.float64)
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), spread
