"""The refiner transformer (video path): forward time of our jitted Flax model vs diffusers' eager
`SanaWMLTX2RefinerTransformer3DModel`, and the compile-only memory per device of the full-size model at 720p.

Speed (default): for each size of --sizes (tiny, medium), a random diffusers model is converted with our converter,
both forwards are checked equal (relative L2) and timed interleaved (median of --repeats after a first call reported
apart) on one refiner block: `--frames` latent frames attending to a K/V prefix of 1 sink frame and `--history`
history frames, as the refiner runs. One line per size ends with `diffusers_over_jax=R spread=S`.

Memory (--memory): the full-size video path (bf16 parameters and compute, 48 layers unless --layers) on one refiner
block at 720p (3 latent frames of 22 x 40 tokens, prefix 1 + 10 frames) is lowered and compiled, not run, on meshes
of --devices fake CPU devices (parameters FSDP-sharded over all of them); each mesh size runs in its own process and
prints the per-device argument, temporary and output bytes of XLA's memory analysis.

    python bench/refiner.py [--sizes tiny medium] [--repeats 5]
    python bench/refiner.py --memory [--devices 1 4 8] [--layers 48]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

SIZES = {
    # heads, head_dim, layers, latent grid (height, width)
    "tiny": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, grid=(4, 6)),
    "medium": dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, grid=(11, 20)),
}
GRID_720P = (22, 40)
FPS = 16.0


def oracle_config(size: str) -> dict:
    fields = SIZES[size]
    inner = fields["num_attention_heads"] * fields["attention_head_dim"]
    return dict(in_channels=128, out_channels=128, num_attention_heads=fields["num_attention_heads"],
                attention_head_dim=fields["attention_head_dim"], cross_attention_dim=inner, caption_channels=inner,
                num_layers=fields["num_layers"], audio_num_attention_heads=2, audio_attention_head_dim=8,
                audio_cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8)


def speed(size: str, args) -> None:
    import torch
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache
    from timing import interleaved, machine_state, report_machine

    from sanawm_jax.checkpoint.torch_sources import TorchStateDictSource
    from sanawm_jax.models.refiner.checkpoint import convert
    from sanawm_jax.models.refiner.config import RefinerConfig
    from sanawm_jax.models.refiner.sampler import forward, frame_rope
    from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer

    before = machine_state()
    dconfig = oracle_config(size)
    torch.manual_seed(0)
    oracle = SanaWMLTX2RefinerTransformer3DModel(**dconfig).eval()
    with torch.no_grad():
        for param in oracle.parameters():
            param.normal_(0, 0.02)
    config = RefinerConfig.from_diffusers_config(dconfig)
    params = jax.device_put(convert(TorchStateDictSource(oracle.state_dict(), "random"), config, log=lambda *_: None))
    model = RefinerTransformer(config)
    height, width = SIZES[size]["grid"]
    rng = np.random.default_rng(0)
    block = list(range(1 + args.history, 1 + args.history + args.frames))
    tokens = rng.standard_normal((1, len(block) * height * width, 128)).astype(np.float32)
    text = rng.standard_normal((1, args.text_len, config.caption_channels)).astype(np.float32)
    mask = np.ones((1, args.text_len), np.int64)
    timesteps = np.full(tokens.shape[:2], 725.0, np.float32)
    history = (config.num_layers, 1, args.history * height * width, config.inner_dim)
    prefix = KVPrefix(*(rng.standard_normal((config.num_layers, 1, height * width, config.inner_dim))
                        .astype(np.float32) for _ in range(2)), frame_rope(config, [0], height, width, FPS),
                      *(rng.standard_normal(history).astype(np.float32) for _ in range(2)))
    rope = frame_rope(config, block, height, width, FPS)
    device_args = jax.device_put((tokens, text, timesteps, rope, mask, prefix))  # held in memory, as on the torch side
    run_jax = lambda: jax.block_until_ready(forward(model, params, *device_args))

    cache = SanaWMRefinerKVCache(config.num_layers)
    for index, layer in enumerate(cache.layer_caches):
        layer.store_sink(torch.from_numpy(prefix.sink_k[index]), torch.from_numpy(prefix.sink_v[index]))
        layer.store_history(torch.from_numpy(prefix.history_k[index]), torch.from_numpy(prefix.history_v[index]))
    with torch.no_grad():
        cache.sink_pe = oracle.build_rotary_emb_for_absolute_positions(1, [0], height, width, "cpu", FPS)
        torch_rope = oracle.build_rotary_emb_for_absolute_positions(1, block, height, width, "cpu", FPS)

    def run_torch():
        with torch.no_grad():
            return oracle(hidden_states=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(text),
                          timestep=torch.from_numpy(timesteps), video_rotary_emb=torch_rope,
                          encoder_attention_mask=torch.from_numpy(mask), kv_cache=cache, kv_cache_mode="inject",
                          return_dict=False)[0]

    timing = interleaved({"jax": run_jax, "diffusers": run_torch}, args.repeats)
    ours, reference = np.asarray(run_jax()), run_torch().numpy()
    relative_l2 = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    print(f"[{size}] {config.num_layers} layers, {config.num_attention_heads} x {config.attention_head_dim} heads, "
          f"block of {args.frames} frames of {height}x{width} + prefix of 1 + {args.history} frames, "
          f"text {args.text_len}; float32, torch {torch.get_num_threads()} threads")
    print(f"[{size}] parity: relative L2 = {relative_l2:.2e}")
    print(f"[{size}] " + timing.line("jax") + " (first call = compilation)")
    print(f"[{size}] " + timing.line("diffusers"))
    report_machine(before)
    ratio, spread = timing.ratio("diffusers", "jax")
    print(f"[{size}] diffusers_over_jax={ratio:.2f} spread={spread:.2f}")


def memory(num_layers: int) -> None:
    """In a process with the fake devices already set: compile the full-size block forward, print its memory."""
    from sanawm_jax.models.refiner.checkpoint import abstract_refiner_params
    from sanawm_jax.models.refiner.config import RefinerConfig
    from sanawm_jax.models.refiner.sampler import frame_rope
    from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer
    from sanawm_jax.parallel import fsdp_shardings, make_mesh

    config = RefinerConfig(num_layers=num_layers, param_dtype="bfloat16", dtype="bfloat16")
    devices = len(jax.devices())
    mesh = make_mesh({"fsdp": devices})
    abstract = abstract_refiner_params(config)
    shardings = fsdp_shardings(abstract, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    height, width = GRID_720P
    frame = height * width
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    prefix = KVPrefix(bf16(num_layers, 1, frame, config.inner_dim), bf16(num_layers, 1, frame, config.inner_dim),
                      frame_rope(config, [0], height, width, FPS),
                      bf16(num_layers, 1, 10 * frame, config.inner_dim), bf16(num_layers, 1, 10 * frame,
                                                                              config.inner_dim))
    block = range(11, 14)
    model = RefinerTransformer(config)
    program = jax.jit(lambda p, x, text, t, pre: model.apply({"params": p}, x, text, t,
                                                             frame_rope(config, block, height, width, FPS), None,
                                                             pre))
    compiled = program.lower(params, bf16(1, 3 * frame, config.in_channels), bf16(1, 1024, config.caption_channels),
                             jax.ShapeDtypeStruct((1, 3 * frame), jnp.float32), prefix).compile()
    stats = compiled.memory_analysis()
    gb = lambda n: f"{n / 2**30:.2f} GiB"
    print(f"mesh fsdp={devices}: {num_layers} layers, bf16, one block at 720p: per device arguments "
          f"{gb(stats.argument_size_in_bytes)}, temporaries {gb(stats.temp_size_in_bytes)}, output "
          f"{gb(stats.output_size_in_bytes)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--frames", type=int, default=3, help="latent frames of the refined block")
    parser.add_argument("--history", type=int, default=4, help="history frames in the K/V prefix")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="compile-only memory of the full-size model instead")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--layers", type=int, default=48, help="layers of the --memory model")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory(args.layers)
    if not args.memory:
        for size in args.sizes:
            speed(size, args)
        return
    for count in args.devices:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
        subprocess.run([sys.executable, __file__, "--memory-child", "--layers", str(args.layers)], check=True,
                       env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})


if __name__ == "__main__":
    main()
