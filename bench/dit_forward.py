"""DiT forward time: our jit-compiled Flax model vs diffusers' eager `SanaWMTransformer3DModel` on this machine.

Builds a random diffusers model of the chosen size, converts its weights with our converter, checks that both give
the same velocity (relative L2), then times a forward pass of each, interleaved (median of --repeats after a
compiling/warm-up first call, reported apart). The last line is `diffusers_over_jax=R spread=S`: R the median of the
per-repeat ratios diffusers / jax, S their relative spread (max - min) / median.

    python bench/dit_forward.py [--layers 4 --hidden 256 --head-dim 64 --frames 5 --height 11 --width 20]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch
from timing import interleaved, machine_state, report_machine

from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
from sanawm_jax.models.sana_wm.checkpoint import convert_state_dict
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The DiT size and latent grid every DiT benchmark takes."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--caption-channels", type=int, default=256)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--height", type=int, default=11)
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--text-len", type=int, default=32)


def model_config_fields(args) -> dict:
    """SanaWMConfig / diffusers `SanaWMTransformer3DModel` fields of the size given by `add_model_arguments`."""
    return dict(
        in_channels=args.channels, num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.hidden // args.head_dim, linear_head_dim=args.head_dim,
        caption_channels=args.caption_channels, chunk_plucker_post_attn_blocks=args.layers,
    )


def random_inputs(rng, args, config):
    b, t, h, w = 1, args.frames, args.height, args.width
    conditions = np.zeros((b, t, 20), np.float32)
    conditions[..., :16] = np.eye(4, dtype=np.float32).reshape(-1)
    conditions[:, :, 3] = np.linspace(0, 1, t)  # move along x
    conditions[..., 16:] = [w * 0.9, h * 1.1, w / 2, h / 2]
    return {
        "latents": rng.standard_normal((b, t, h, w, config.in_channels)).astype(np.float32),
        "timesteps": np.concatenate([[0.0], rng.uniform(0, 1000, t - 1)]).astype(np.float32)[None],
        "text": rng.standard_normal((b, args.text_len, config.caption_channels)).astype(np.float32),
        "text_mask": np.ones((b, args.text_len), np.int64),
        "camera_conditions": conditions,
        "chunk_plucker": rng.standard_normal((b, t, h, w, 48)).astype(np.float32),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    before = machine_state()

    from diffusers import SanaWMTransformer3DModel

    diffusers_config = model_config_fields(args)
    torch.manual_seed(0)
    oracle = SanaWMTransformer3DModel(**diffusers_config).eval()
    with torch.no_grad():
        for param in oracle.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    config = SanaWMConfig.from_diffusers_config(diffusers_config)
    # Both sides hold their weights and inputs in memory: the converted numpy arrays are put on the device once, as a
    # sampling loop holds them (a numpy argument is copied into a fresh device buffer on every call).
    params = jax.device_put(
        convert_state_dict(TorchStateDictSource(oracle.state_dict(), "random oracle"), config, log=lambda *_: None)
    )
    host_inputs = random_inputs(np.random.default_rng(0), args, config)
    inputs = jax.device_put(host_inputs)

    forward = jax.jit(SanaWMTransformer(config).apply)
    run_jax = lambda: jax.block_until_ready(forward({"params": params}, **inputs))

    torch_inputs = dict(
        hidden_states=torch.from_numpy(host_inputs["latents"]).permute(0, 4, 1, 2, 3),
        timestep=torch.from_numpy(host_inputs["timesteps"])[:, None],
        encoder_hidden_states=torch.from_numpy(host_inputs["text"])[:, None],
        encoder_attention_mask=torch.from_numpy(host_inputs["text_mask"]),
        camera_conditions=torch.from_numpy(host_inputs["camera_conditions"]),
        chunk_plucker=torch.from_numpy(host_inputs["chunk_plucker"]).permute(0, 4, 1, 2, 3),
    )

    def run_torch():
        with torch.no_grad():
            return oracle(**torch_inputs).sample

    timing = interleaved({"jax": run_jax, "diffusers": run_torch}, args.repeats)
    ours, reference = np.asarray(run_jax()), run_torch().permute(0, 2, 3, 4, 1).numpy()
    relative_l2 = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    tokens = args.frames * args.height * args.width
    print(f"config: {args.layers} layers, hidden {args.hidden}, head dim {args.head_dim}, "
          f"latent {args.frames}x{args.height}x{args.width} ({tokens} tokens), text {args.text_len}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, {args.repeats} interleaved repeats")
    print(f"parity (float32 vs upstream's bf16-rounded softmax inputs): relative L2 = {relative_l2:.2e}")
    print(timing.line("jax") + " (first call = compilation)")
    print(timing.line("diffusers"))
    report_machine(before)
    ratio, spread = timing.ratio("diffusers", "jax")
    print(f"diffusers_over_jax={ratio:.2f} spread={spread:.2f}")

if __name__ == "__main__":
    main()
