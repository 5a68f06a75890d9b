"""Peak memory of `decode_tiled` for the released LTX-2 VAE decoder, measured small and extrapolated to 961x704x1280.

Method
  1. XLA buffer analysis (compile only, nothing is allocated): for the released decoder in float32, the bytes of
     temporaries, arguments (parameters + latents) and output of the one program `decode_tiled` runs per tile,
     (1, 13, h, w, 128) latents, at the measured grids and at the real 22x40 grid; and of the untiled 121-frame
     program for comparison.
  2. Measurement: in a fresh process per case, `decode_tiled` runs the released widths (zero weights) on a small latent
     grid for 1 and 3 tiles; the peak RSS growth during the call (VmHWM after resetting it) is compared with the
     analysis for that shape: temporaries + tile output + the host output array + one host copy of a tile.
  3. Extrapolation: the analysis at 22x40 is the per-tile device footprint at 720p; the host side adds the output
     array (961 frames) and one tile copy. Tiles have one shape, so nothing grows with the video length except the
     host output array.

  4. Speed (--speed): the released decoder (random weights converted by our converter) decoding a small latent video,
     our jit-compiled `decode` against diffusers' eager `AutoencoderKLLTX2Video.decode`, interleaved (median of
     --repeats, compilation reported apart), with the parity of the outputs. The last line is
     `diffusers_over_jax=R spread=S`.

Usage: python bench/vae_decode.py [--grids 2x3 4x6] [--tiles 1 3] [--analysis-only]
       python bench/vae_decode.py --speed [--speed-latents 2x2x3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.ltx2_vae import (
    VAE_PRESETS,
    VideoAutoencoder,
    abstract_vae_params,
    decode_tiled,
)

GiB = 2**30
TILE, OVERLAP = 13, 5  # upstream's 96-frame tiles with a 64-frame stride
RELEASED_GRID = (22, 40)  # 704 x 1280 pixels
RELEASED_LATENT_FRAMES = 121  # 961 pixel frames


def decoder_params(config, abstract: bool):
    """Only what `decode` touches: the decoder and the latent statistics (zeros when materialised)."""
    tree = abstract_vae_params(config)
    tree = {key: tree[key] for key in ("decoder", "latents_mean", "latents_std")}
    return tree if abstract else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def decode_program(config):
    return jax.jit(lambda params, latents: VideoAutoencoder(config).apply({"params": params}, latents, method="decode"))


def analyse(config, frames: int, height: int, width: int) -> dict:
    latents = jax.ShapeDtypeStruct((1, frames, height, width, config.latent_channels), jnp.float32)
    stats = decode_program(config).lower(decoder_params(config, abstract=True), latents).compile().memory_analysis()
    return {
        "temp": stats.temp_size_in_bytes,
        "arguments": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
    }


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(height: int, width: int, tiles: int) -> dict:
    """Run decode_tiled on `tiles` full tiles and report the peak RSS growth during the call."""
    config = VAE_PRESETS["ltx2_video"]
    params = decoder_params(config, abstract=False)
    frames = TILE + (TILE - OVERLAP) * (tiles - 1)
    latents = np.zeros((1, frames, height, width, config.latent_channels), np.float32)
    decode_program(config).lower(params, latents[:, :TILE]).compile()  # warm the compiler's own allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = current_rss_bytes()
    start = time.perf_counter()
    video = decode_tiled(params, latents, config, tile_latent_frames=TILE, overlap=OVERLAP)
    seconds = time.perf_counter() - start
    return {
        "grid": f"{height}x{width}",
        "tiles": tiles,
        "frames": video.shape[1],
        "peak_growth": peak_rss_bytes() - before,
        "host_output": video.nbytes,
        "seconds": seconds,
    }


def measure_in_subprocess(height: int, width: int, tiles: int) -> dict:
    command = [sys.executable, __file__, "--measure", f"{height}x{width}", str(tiles)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# The released decoder in diffusers' spelling; the other defaults of `AutoencoderKLLTX2Video` are the released ones.
RELEASED_DIFFUSERS_FIELDS = ("latent_channels", "block_out_channels", "decoder_block_out_channels", "layers_per_block",
                             "decoder_layers_per_block", "upsample_factor", "upsample_residual", "decoder_causal")


def speed(frames: int, height: int, width: int, repeats: int) -> None:
    """Time our jitted decode against diffusers' eager decode of (1, frames, height, width, 128) latents."""
    import torch
    from diffusers import AutoencoderKLLTX2Video
    from timing import interleaved, machine_state, report_machine

    from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
    from sanawm_jax.models.ltx2_vae import VAEConfig
    from sanawm_jax.models.ltx2_vae.checkpoint import convert_vae_state_dict

    before = machine_state()
    released = VAE_PRESETS["ltx2_video"]
    torch.manual_seed(0)
    oracle = AutoencoderKLLTX2Video(**{name: getattr(released, name) for name in RELEASED_DIFFUSERS_FIELDS}).eval()
    config = VAEConfig.from_diffusers_config(dict(oracle.config))
    if config != released:
        raise ValueError("the diffusers VAE built for the benchmark does not have the released configuration")
    params = convert_vae_state_dict(TorchStateDictSource(oracle.state_dict(), "benchmark"), config)
    # On the device once, as a sampling pipeline holds them: a numpy argument would be copied into fresh device buffers
    # on every call (for these 1.8 GB of weights, ~470k page faults and 0.9 s of system time per decode).
    params = jax.device_put({key: params[key] for key in ("decoder", "latents_mean", "latents_std")})
    oracle.encoder = None  # only the decoder is timed; frees its memory
    latents = np.random.default_rng(0).standard_normal((1, frames, height, width, config.latent_channels))
    latents = latents.astype(np.float32)
    program = decode_program(config)
    device_latents = jax.device_put(latents)
    run_jax = lambda: jax.block_until_ready(program(params, device_latents))
    torch_latents = torch.from_numpy(latents).permute(0, 4, 1, 2, 3)
    mean, std = oracle.latents_mean.view(1, -1, 1, 1, 1), oracle.latents_std.view(1, -1, 1, 1, 1)

    def run_torch():
        with torch.no_grad():
            return oracle.decode(torch_latents / oracle.config.scaling_factor * std + mean, return_dict=False)[0]

    timing = interleaved({"jax": run_jax, "diffusers": run_torch}, repeats)
    ours, reference = np.asarray(run_jax()), run_torch().permute(0, 2, 3, 4, 1).numpy()
    relative_l2 = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    print(f"released decoder, latents {frames}x{height}x{width} -> video {ours.shape[1:4]}, float32; jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), {repeats} interleaved "
          f"repeats; parity relative L2 = {relative_l2:.1e}")
    print(timing.line("jax") + " (first call = compilation)")
    print(timing.line("diffusers"))
    report_machine(before)
    ratio, spread = timing.ratio("diffusers", "jax")
    print(f"diffusers_over_jax={ratio:.2f} spread={spread:.2f}")


def parse_grid(text: str) -> tuple[int, int]:
    height, width = text.split("x")
    return int(height), int(width)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", nargs="+", default=["2x3"], help="latent grids to measure (h x w)")
    parser.add_argument("--tiles", nargs="+", type=int, default=[1, 3], help="tile counts to measure")
    parser.add_argument("--analysis-only", action="store_true", help="skip the measured runs")
    parser.add_argument("--speed", action="store_true", help="time the decode against diffusers instead")
    parser.add_argument("--speed-latents", default="2x2x3", help="latent T x h x w of the speed comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("GRID", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*parse_grid(args.measure[0]), int(args.measure[1]))))
        return
    if args.speed:
        speed(*(int(n) for n in args.speed_latents.split("x")), args.repeats)
        return

    config = VAE_PRESETS["ltx2_video"]
    params_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(decoder_params(config, True)))
    print(f"released decoder, float32: {params_bytes / GiB:.2f} GiB of parameters")
    print("\nXLA buffer analysis of one decode program (GiB):")
    print("| latents (T, h, w) | pixels | temporaries | arguments | output |")
    print("|---|---|---|---|---|")
    cases = [(TILE, *parse_grid(grid)) for grid in args.grids]
    cases += [(TILE, *RELEASED_GRID), (RELEASED_LATENT_FRAMES, *RELEASED_GRID)]
    analyses = {}
    for frames, height, width in cases:
        stats = analyses[(frames, height, width)] = analyse(config, frames, height, width)
        pixels = f"{config.num_pixel_frames(frames)}x{32 * height}x{32 * width}"
        print(f"| {frames}x{height}x{width} | {pixels} | {stats['temp'] / GiB:.3f} | "
              f"{stats['arguments'] / GiB:.3f} | {stats['output'] / GiB:.3f} |")

    if not args.analysis_only:
        print("\nMeasured decode_tiled (released widths, zero weights, float32), peak RSS growth during the call:")
        print("| grid | tiles | frames | measured peak growth MiB | predicted MiB | seconds |")
        print("|---|---|---|---|---|---|")
        for grid in args.grids:
            height, width = parse_grid(grid)
            stats = analyses[(TILE, height, width)]
            for tiles in args.tiles:
                run = measure_in_subprocess(height, width, tiles)
                predicted = stats["temp"] + 2 * stats["output"] + run["host_output"]
                print(f"| {grid} | {tiles} | {run['frames']} | {run['peak_growth'] / 2**20:.0f} | "
                      f"{predicted / 2**20:.0f} | {run['seconds']:.0f} |")

    tile = analyses[(TILE, *RELEASED_GRID)]
    untiled = analyses[(RELEASED_LATENT_FRAMES, *RELEASED_GRID)]
    frames = config.num_pixel_frames(RELEASED_LATENT_FRAMES)
    host_float = frames * 704 * 1280 * 3 * 4
    host_uint8 = host_float // 4
    device = params_bytes + tile["temp"] + tile["output"]
    print(f"\nExtrapolation to {frames}x704x1280 with {TILE}/{OVERLAP} tiles (float32):")
    print(f"  per-tile device peak: {device / GiB:.1f} GiB (parameters {params_bytes / GiB:.1f} + temporaries "
          f"{tile['temp'] / GiB:.1f} + tile output {tile['output'] / GiB:.1f}); untiled: "
          f"{(params_bytes + untiled['temp'] + untiled['output']) / GiB:.1f} GiB")
    print(f"  host: output array {host_float / GiB:.1f} GiB float32 or {host_uint8 / GiB:.1f} GiB uint8, "
          f"plus one tile copy {tile['output'] / GiB:.1f} GiB")


if __name__ == "__main__":
    main()
