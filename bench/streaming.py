"""Streaming sampler benchmark.

1. Timing (a small model, CPU by default): per-block latency and real-time factor of the few-step streaming sampler
   (`diffusion.streaming`: 4 Euler steps and one cache pass per block) against sampling the same frames with the
   bidirectional model (all frames jointly, --bidirectional-steps steps with CFG --cfg). DiT sampling only, no VAE.
   Everything is compiled by an untimed first run; the timed runs report the median over --repeats.
   Real-time factor = seconds of 16 fps video (24 pixel frames per latent block, 25 for the first) / wall seconds.
2. Compile-only cost of one streaming block at --cost-config size (default: the 2.6B model at 720p, 22x40 latents,
   bf16): XLA's FLOP count and bytes accessed of one steady-state DiT forward (a 3-frame block with a full stream
   state), the compiled program's memory, and a roofline estimate for one H100 (989 TFLOP/s dense bf16, 3.35 TB/s):
   time per block >= 5 forwards x max(FLOPs / peak, bytes / bandwidth). Parameters and state are abstract
   (eval_shape), nothing is allocated.

    python bench/streaming.py                                   # timing at the default small size, then 720p cost
    python bench/streaming.py --cost-config sana_wm_tiny --cost-height 2 --cost-width 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import machine_state, report_machine

from sanawm_jax.demo import random_params
from sanawm_jax.diffusion.sampler import sample
from sanawm_jax.diffusion.scheduler import SamplerConfig
from sanawm_jax.diffusion.streaming import StreamingSamplerConfig, stream_sample
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.streaming import init_stream_state
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs

FPS = 16
H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sana_wm_tiny", help="model preset of the timing part")
    parser.add_argument("--latent-frames", type=int, default=13, help="3k + 1 latent frames (13 = 97 pixel frames)")
    parser.add_argument("--height", type=int, default=4)
    parser.add_argument("--width", type=int, default=7)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--bidirectional-steps", type=int, default=60)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cost-config", default="sana_wm_2.6b")
    parser.add_argument("--cost-height", type=int, default=22)
    parser.add_argument("--cost-width", type=int, default=40)
    parser.add_argument("--cost-dtype", default="bfloat16")
    parser.add_argument("--skip-timing", action="store_true")
    return parser.parse_args()


def pixel_frames(start: int, end: int) -> int:
    return 8 * (end - start) - (7 if start == 0 else 0)


def inputs(config, args, rng):
    b, t, h, w = 1, args.latent_frames, args.height, args.width
    conditions = np.zeros((b, t, 20), np.float32)
    conditions[..., :16] = np.eye(4, dtype=np.float32).reshape(-1)
    conditions[:, :, 3] = np.linspace(0, 1, t)
    conditions[..., 16:] = [w * 0.9, h * 1.1, w / 2, h / 2]
    noise = rng.standard_normal((b, t, h, w, config.in_channels)).astype(np.float32)
    return dict(
        first_frame_latent=jnp.asarray(noise[:, :1]), noise=jnp.asarray(noise),
        text=jnp.asarray(rng.standard_normal((b, args.text_len, config.caption_channels)), jnp.float32),
        text_mask=jnp.ones((b, args.text_len), jnp.int32), camera_conditions=jnp.asarray(conditions),
        chunk_plucker=jnp.asarray(rng.standard_normal((b, t, h, w, 48)), jnp.float32),
    )


def time_streaming(model, params, args_in):
    """Seconds per block of one streamed clip (each block waited for), and the block bounds."""
    seconds, bounds, clock = [], [], time.perf_counter()
    for block in stream_sample(model, params, config=StreamingSamplerConfig(), **args_in):
        block.latents.block_until_ready()
        now = time.perf_counter()
        seconds.append(now - clock)
        bounds.append((block.start, block.end))
        clock = now
    return seconds, bounds


def timing(args):
    config = PRESETS[args.config]
    rng = np.random.default_rng(0)
    params = jax.device_put(random_params(abstract_params(config), rng))  # held on the device, as a sampler holds them
    args_in = inputs(config, args, rng)
    streaming = SanaWMTransformer(config.replace(mode="streaming"))
    bidirectional = SanaWMTransformer(config)
    sampler = SamplerConfig(num_steps=args.bidirectional_steps, guidance_scale=args.cfg)
    negative = {"negative_text": args_in["text"], "negative_text_mask": args_in["text_mask"]}

    def run_bidirectional():
        start = time.perf_counter()
        sample(bidirectional, params, config=sampler, progress=False, **negative, **args_in).block_until_ready()
        return time.perf_counter() - start

    first_stream, bounds = time_streaming(streaming, params, args_in)
    first_bidirectional = run_bidirectional()
    streamed = [time_streaming(streaming, params, args_in)[0] for _ in range(args.repeats)]
    joint = [run_bidirectional() for _ in range(args.repeats)]

    frames = pixel_frames(0, args.latent_frames)
    video_seconds = frames / FPS
    per_block = [statistics.median(times[i] for times in streamed) for i in range(len(bounds))]
    total_stream = statistics.median(sum(times) for times in streamed)
    total_joint = statistics.median(joint)
    print(f"timing: {args.config}, {args.latent_frames} latent frames ({frames} pixel frames, {video_seconds:.2f} s "
          f"of video) on a {args.height}x{args.width} latent grid, {jax.devices()[0].platform}")
    print(f"streaming: first run (compiles) {sum(first_stream):.2f} s; blocks of {len(bounds)}:")
    for (start, end), seconds in zip(bounds, per_block):
        print(f"  block {start}-{end - 1}: {1e3 * seconds:.1f} ms, real-time factor "
              f"{pixel_frames(start, end) / FPS / seconds:.2f}")
    print(f"streaming: whole clip {total_stream:.3f} s, real-time factor {video_seconds / total_stream:.2f}, first "
          f"frames after {1e3 * per_block[0]:.1f} ms")
    print(f"bidirectional ({args.bidirectional_steps} steps, cfg {args.cfg}): first run (compiles) "
          f"{first_bidirectional:.2f} s; whole clip {total_joint:.3f} s, real-time factor "
          f"{video_seconds / total_joint:.2f}, first frames after {total_joint:.3f} s")
    print(f"bidirectional_over_streaming={total_joint / total_stream:.2f}")


def block_cost(args):
    """XLA cost and memory of one steady-state streaming forward (3 frames, full state) at the cost size."""
    config = PRESETS[args.cost_config].replace(mode="streaming", dtype=args.cost_dtype, param_dtype=args.cost_dtype)
    model = SanaWMTransformer(config)
    frames, h, w = config.chunk_frames, args.cost_height, args.cost_width
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    block_inputs = abstract(jax.eval_shape(lambda: example_inputs(config, 1, frames, h, w, text_len=300)))
    state = jax.eval_shape(lambda: init_stream_state(config, 1, h, w)._replace(block=jnp.int32(5)))
    params = abstract_params(config)

    def forward(params, block_inputs, state):
        return model.apply({"params": params}, **block_inputs, stream_state=state)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(params, block_inputs, state).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    forwards = len(StreamingSamplerConfig().denoising_steps)  # 4 steps and the cache pass
    seconds = forwards * max(flops / H100_BF16_FLOPS, accessed / H100_BYTES_PER_S)
    video = pixel_frames(1, 1 + frames) / FPS
    print(f"cost: {args.cost_config} {args.cost_dtype}, block of {frames} latent frames on {h}x{w} "
          f"({frames * h * w} tokens; window of {config.num_cached_blocks} blocks), compiled in {compile_seconds:.1f} s")
    print(f"  one forward: {flops / 1e9:.3f} GFLOP, {accessed / 1e9:.3f} GB accessed")
    if memory is not None:
        print(f"  compiled memory: arguments {memory.argument_size_in_bytes / 1e9:.3f} GB, outputs "
              f"{memory.output_size_in_bytes / 1e9:.3f} GB, temporaries {memory.temp_size_in_bytes / 1e9:.3f} GB")
    print(f"  per block ({forwards} forwards): {forwards * flops / 1e9:.3f} GFLOP")
    print(f"  H100 roofline: >= {1e3 * seconds:.1f} ms per block ({video:.2f} s of video): real-time factor <= "
          f"{video / seconds:.2f}")


def main():
    args = parse_args()
    state = machine_state()
    if not args.skip_timing:
        timing(args)
    block_cost(args)
    report_machine(state)


if __name__ == "__main__":
    main()
