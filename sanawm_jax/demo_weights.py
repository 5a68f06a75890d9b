"""Build the trained weights of the embedded demo (`sample.py` without --checkpoint, bidirectional mode).

    python -m sanawm_jax.demo_weights                    # rewrites sanawm_jax/assets/{demo_weights.safetensors,
                                                         #   courtyard.png, courtyard.json}
    python -m sanawm_jax.demo_weights --out DIR --small  # a quick build at a small size (tests)

Steps (`RECIPE`): render synthetic courtyard clips (`data.synthetic`) at the demo's frame size; train the tiny LTX-2
VAE on them as an autoencoder (`training.autoencoder`) and set its latent statistics; cache the clips' latents,
camera tensors and caption embeddings (the demo's random text encoder); train the tiny DiT (the full model) on them
(`training.in_memory`); write both as one safetensors file, and the first frame of a held-out clip (another seed)
with its intrinsics and caption as the demo's first frame. Every random choice is seeded and the computation is
float32 on the CPU, so a rebuild on the same software writes the same bytes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sanawm_jax import cli, demo
from sanawm_jax.data.evaluation import psnr_per_frame, ssim_per_frame
from sanawm_jax.data.synthetic_set import dit_examples, render_clips
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.training.autoencoder import AutoencoderConfig, train_autoencoder, with_latent_statistics
from sanawm_jax.training.config import TrainConfig
from sanawm_jax.training.in_memory import train_in_memory

RECIPE = {
    "data_seed": 7,
    "num_clips": 40,
    "num_frames": 17,
    "size": demo.TARGET_SIZE,
    "held_out": {"seed": 8, "index": 0, "num_clips": 4},
    "vae": AutoencoderConfig(learning_rate=1e-3, kl_weight=1e-6, num_steps=400, batch_size=4, num_frames=9,
                             crop_size=(64, 96), seed=0),
    "dit": TrainConfig(learning_rate=1e-3, batch_size=8, num_steps=500, text_dropout=0.1, seed=0, num_frames=17,
                       target_size=demo.TARGET_SIZE),
}
SMALL = {
    **RECIPE,
    "num_clips": 2,
    "size": (64, 96),
    "held_out": {"seed": 8, "index": 0, "num_clips": 1},
    "vae": RECIPE["vae"].replace(num_steps=2, batch_size=1, crop_size=(64, 96)),
    "dit": RECIPE["dit"].replace(num_steps=2, batch_size=2, target_size=(64, 96)),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reconstruction_metrics(vae_config, vae_params, clips) -> dict[str, float]:
    """Mean per-frame PSNR (dB) and SSIM of the VAE's reconstructions of clips against their frames (the ceiling
    of any pixel-space comparison through this VAE)."""
    psnr, ssim = [], []
    for rendered in clips:
        latents = vae.encode(vae_params, rendered.model_video[None], vae_config)
        decoded = vae.video_to_uint8(vae.decode(vae_params, latents, vae_config))[0]
        psnr.append(psnr_per_frame(decoded, rendered.frames))
        ssim.append(ssim_per_frame(decoded, rendered.frames))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


def build(out_dir, recipe: dict = RECIPE) -> dict:
    """Write `demo.DEMO_WEIGHTS`, `demo.EXAMPLE_IMAGE` and `demo.EXAMPLE_INTRINSICS` into out_dir; returns a
    summary (timings, final losses, the VAE's held-out reconstruction metrics)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, start = {}, time.perf_counter()
    size, held = recipe["size"], recipe["held_out"]
    clips = render_clips(recipe["data_seed"], recipe["num_clips"], recipe["num_frames"], size)
    held_out = render_clips(held["seed"], held["num_clips"], recipe["num_frames"], size)
    summary["render_s"] = time.perf_counter() - start
    log(f"rendered {len(clips)} training and {len(held_out)} held-out clips in {summary['render_s']:.0f} s")

    vae_config = vae.VAE_PRESETS["ltx2_video_tiny"]
    videos = np.stack([rendered.model_video for rendered in clips])
    step_start = time.perf_counter()
    def log_vae(record):
        if record["step"] % 20 == 0:
            log(f"vae step {record['step']}: mse {record['mse']:.4f}")

    vae_params, history = train_autoencoder(vae_config, videos, recipe["vae"], log=log_vae)
    vae_params = with_latent_statistics(vae_params, vae_config, videos)
    summary["vae_train_s"] = time.perf_counter() - step_start
    summary["vae_final_mse"] = history[-1]["mse"] if history else None
    summary["vae_held_out"] = reconstruction_metrics(vae_config, vae_params, held_out)
    log(f"vae trained in {summary['vae_train_s']:.0f} s; held-out reconstruction {summary['vae_held_out']}")

    text_encoder = demo.random_world_model(demo.TEXT_ENCODER_SEED).text_encoder
    examples, null_text = dit_examples(clips, vae_config, vae_params, text_encoder)
    dit_config = demo.demo_config()
    step_start = time.perf_counter()
    def log_dit(step, loss):
        if step % 50 == 0:
            log(f"dit step {step}: loss {loss:.4f}")

    dit_params, losses = train_in_memory(dit_config, recipe["dit"], examples, null_text, log=log_dit)
    summary["dit_train_s"] = time.perf_counter() - step_start
    summary["dit_final_loss"] = float(np.mean(losses[-50:])) if losses else None

    demo.save_trained_weights(out_dir / demo.DEMO_WEIGHTS, dit_config, dit_params, vae_config, vae_params)
    first = held_out[held["index"]]
    Image.fromarray(first.frames[0]).save(out_dir / demo.EXAMPLE_IMAGE)
    description = {
        "intrinsics": [float(value) for value in first.clip.intrinsics[0]],
        "caption": first.clip.scene.caption,
        "synthetic_clip": {"seed": held["seed"], "index": held["index"], "num_frames": recipe["num_frames"]},
    }
    (out_dir / demo.EXAMPLE_INTRINSICS).write_text(json.dumps(description, indent=2) + "\n")
    summary["total_s"] = time.perf_counter() - start
    log(f"wrote {out_dir / demo.DEMO_WEIGHTS} in {summary['total_s']:.0f} s")
    return summary


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(demo.asset_path("")), help="output folder (default: the package assets)")
    parser.add_argument("--small", action="store_true", help="a few steps on two small clips (for tests)")
    args = parser.parse_args(argv)
    summary = build(args.out, SMALL if args.small else RECIPE)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    cli.run(main)
