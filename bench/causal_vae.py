"""Per-block cost of decoding a stream with the causal LTX-2 decoder (`CausalDecoder.decode_chunk`).

1. Compile only (default): the released decoder widths at 720p (latent grid 22x40), for the first block (4 latent
   frames -> 25 pixel frames) and every later block (3 -> 24): XLA's FLOP and byte counts, its buffer sizes
   (temporaries, and the carried cache in the arguments), and a roofline time of the block on one H100 SXM
   (max(FLOPs / 989 TFLOP/s dense bf16, bytes / 3.35 TB/s)) against the 1.5 s of 16 fps video a later block adds.
2. Measured (--speed): a stream of blocks decoded one by one with the carried cache, against the jitted whole-clip
   decode of the same latents (timed interleaved, see timing.py); per-block wall-clock and the real-time factor of
   the decode alone (seconds of video per second). Tiny preset by default (`--preset ltx2_video` for the released
   widths with zero weights).

Usage: python bench/causal_vae.py [--dtype float32 bfloat16] [--grid 22x40]
       python bench/causal_vae.py --speed [--preset ltx2_video_tiny] [--grid 2x3] [--blocks 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.ltx2_vae import VAE_PRESETS, CausalDecoder, abstract_vae_params, decode, init_vae_params
from sanawm_jax.models.ltx2_vae.causal import decode_step

GiB = 2**30
FIRST_BLOCK, BLOCK = 4, 3  # latent frames: the streaming sampler's first block, then blocks of 3
FPS = 16
H100_BF16_FLOPS = 989e12  # dense, SXM
H100_BYTES_PER_S = 3.35e12  # HBM3


def decoder_params(config, abstract: bool):
    """Only what decoding touches: the decoder and the latent statistics (zeros when materialised)."""
    tree = abstract_vae_params(config)
    tree = {key: tree[key] for key in ("decoder", "latents_mean", "latents_std")}
    return tree if abstract else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def analyse(config, grid: tuple[int, int]) -> list[dict]:
    """Compile the first-block and later-block programs and return their XLA cost and memory analyses."""
    decoder = CausalDecoder(config)
    params = decoder_params(config, abstract=True)
    empty = jax.eval_shape(lambda: decoder.init_cache(1, *grid))
    started = jax.eval_shape(
        lambda p, z, c: decode_step(p, z, c, config)[1], params,
        jax.ShapeDtypeStruct((1, FIRST_BLOCK, *grid, config.latent_channels), jnp.float32), empty)
    rows = []
    for name, frames, cache in (("first", FIRST_BLOCK, empty), ("later", BLOCK, started)):
        latents = jax.ShapeDtypeStruct((1, frames, *grid, config.latent_channels), jnp.float32)
        compiled = decode_step.lower(params, latents, cache, config).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        cache_bytes = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(cache.frames))
        pixel_frames = config.num_pixel_frames(frames) if name == "first" else 8 * frames
        roofline = max(cost["flops"] / H100_BF16_FLOPS, cost["bytes accessed"] / H100_BYTES_PER_S)
        rows.append({"block": name, "latent_frames": frames, "pixel_frames": pixel_frames,
                     "tflops": cost["flops"] / 1e12, "gbytes": cost["bytes accessed"] / 1e9,
                     "temp_gib": memory.temp_size_in_bytes / GiB, "cache_gib": cache_bytes / GiB,
                     "h100_ms": 1e3 * roofline, "video_s": pixel_frames / FPS})
    return rows


def speed(config, grid: tuple[int, int], blocks: int, repeats: int) -> None:
    from timing import interleaved, machine_state, report_machine

    before = machine_state()
    params = init_vae_params(config, jax.random.key(0))
    num_latent = FIRST_BLOCK + BLOCK * (blocks - 1)
    latents = np.random.default_rng(0).standard_normal((1, num_latent, *grid, config.latent_channels), np.float32)
    decoder = CausalDecoder(config)
    block_seconds: list[float] = []

    def stream():
        cache, start, outputs = decoder.init_cache(1, *grid), 0, []
        for size in [FIRST_BLOCK] + [BLOCK] * (blocks - 1):
            tick = time.perf_counter()
            frames, cache = decoder.decode_chunk(params, latents[:, start : start + size], cache)
            outputs.append(jax.block_until_ready(frames))
            block_seconds.append(time.perf_counter() - tick)
            start += size
        return outputs

    whole = lambda: jax.block_until_ready(decode(params, latents, config))
    timing = interleaved({"stream": stream, "whole": whole}, repeats)
    difference = np.abs(np.concatenate([np.asarray(x) for x in stream()], axis=1) - np.asarray(whole())).max()
    later = block_seconds[-(blocks - 1):] if blocks > 1 else block_seconds
    video_seconds = 8 * BLOCK / FPS
    print(f"{config.latent_channels}-channel latents {num_latent}x{grid[0]}x{grid[1]} in {blocks} blocks "
          f"({FIRST_BLOCK}, then {BLOCK}), {config.dtype}; stream vs whole max |diff| = {difference:.1e}")
    print(timing.line("stream") + " (first call = compilation of both block programs)")
    print(timing.line("whole"))
    print(f"later block (last repeat): median {1e3 * float(np.median(later)):.1f} ms for {video_seconds:.2f} s of "
          f"video: real-time factor {video_seconds / float(np.median(later)):.2f}")
    report_machine(before)


def parse_grid(text: str) -> tuple[int, int]:
    height, width = text.split("x")
    return int(height), int(width)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="time a decoded stream instead of compiling only")
    parser.add_argument("--preset", help="VAE preset (default: ltx2_video, or ltx2_video_tiny with --speed)")
    parser.add_argument("--grid", default=None, help="latent grid h x w (default: 22x40, or 2x3 with --speed)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="compute dtypes to analyse")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    preset = args.preset or ("ltx2_video_tiny" if args.speed else "ltx2_video")
    grid = parse_grid(args.grid or ("2x3" if args.speed else "22x40"))
    config = VAE_PRESETS[preset].replace(decoder_causal=True)
    if args.speed:
        speed(config, grid, args.blocks, args.repeats)
        return
    print(f"causal decoder ({preset}), latent grid {grid[0]}x{grid[1]}, compile only")
    print("| dtype | block | latent -> pixel frames | TFLOP | GB accessed | temporaries GiB | cache GiB | "
          "H100 roofline ms | video s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for row in analyse(config.replace(dtype=dtype, param_dtype=dtype), grid):
            print(f"| {dtype} | {row['block']} | {row['latent_frames']} -> {row['pixel_frames']} | "
                  f"{row['tflops']:.2f} | {row['gbytes']:.1f} | {row['temp_gib']:.2f} | {row['cache_gib']:.3f} | "
                  f"{row['h100_ms']:.1f} | {row['video_s']:.3f} |")


if __name__ == "__main__":
    main()
