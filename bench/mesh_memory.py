"""Per-device memory and FLOPs of the DiT forward (or train step) on a device mesh, from XLA's analyses of the
compiled program; nothing is run. By default the mesh is made of fake CPU devices (`--backend cpu`), so any mesh can
be analysed on one machine; `--backend default` uses the real devices.

    python bench/mesh_memory.py --config sana_wm_2.6b --frames 21 --mesh fsdp=2,context=4
    python bench/mesh_memory.py --config sana_wm_tiny --frames 3 --height 64 --width 96 --mesh fsdp=2,tensor=2 --train

The forward takes a batch of --batch clips of --frames latent frames at --height x --width pixels (latent grid
/32), 300 text tokens and the camera inputs; --train compiles the whole train step (loss, gradients, AdamW update)
with per-block remat. Parameters are in --dtype too (default bfloat16). XLA's CPU backend upcasts bf16 dot operands,
so a CPU analysis of a bf16 program includes float32 copies of the weights (about 10 GiB for the 2.6B model);
float32 figures are the cleaner CPU proxy. The last line is
`temp_bytes_per_device=N argument_bytes_per_device=N flops_per_device=N`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sanawm_jax.parallel.mesh import format_mesh, mesh_sizes, parse_mesh  # noqa: E402  (no device touched)

TEXT_TOKENS = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sana_wm_2.6b", help="preset name or config JSON")
    parser.add_argument("--frames", type=int, default=21, help="latent frames")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--mesh", default="fsdp=8", help="AXIS=N,... over data, fsdp, context, tensor")
    parser.add_argument("--train", action="store_true", help="the train step (with remat) instead of the forward")
    parser.add_argument("--mode", help="DiT mode (default: the config's)")
    parser.add_argument("--backend", choices=["cpu", "default"], default="cpu",
                        help="cpu: as many fake CPU devices as the mesh needs; default: JAX's devices")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = mesh_sizes(parse_mesh(args.mesh))
    if args.backend == "cpu":  # before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={math.prod(sizes.values())}").strip()
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from sanawm_jax.models.sana_wm.config import get_config
    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs
    from sanawm_jax.parallel import batch_spec, make_mesh, param_shardings
    from sanawm_jax.training.config import TrainConfig
    from sanawm_jax.training.loop import make_optimizer, train_step_fn

    overrides = {"dtype": args.dtype, "param_dtype": args.dtype, "remat": args.train}
    if args.mode:
        overrides["mode"] = args.mode
    config = get_config(args.config, **overrides)
    mesh = make_mesh(sizes)
    _, patch_h, patch_w = config.patch_size
    inputs = jax.eval_shape(lambda: example_inputs(
        config, batch=args.batch, frames=args.frames, height=args.height // 32 // patch_h,
        width=args.width // 32 // patch_w, text_len=TEXT_TOKENS))
    with_sharding = lambda tree, shardings: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    batch = lambda tree: with_sharding(tree, jax.tree.map(
        lambda a: NamedSharding(mesh, batch_spec(a.shape, mesh)), tree))
    params = abstract_params(config)
    params = with_sharding(params, param_shardings(params, mesh))
    model = SanaWMTransformer(config)
    if args.train:
        train_config = TrainConfig()
        optimizer = make_optimizer(train_config)
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_state = with_sharding(opt_state, param_shardings(opt_state, mesh))
        model_batch = batch({k: v for k, v in inputs.items() if k != "timesteps"})
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
        program, operands = jax.jit(train_step_fn(model, optimizer, train_config)), (params, opt_state, model_batch,
                                                                                      key)
    else:
        program = jax.jit(lambda p, x: model.apply({"params": p}, **x))
        operands = (params, batch(inputs))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = program.lower(*operands).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = args.batch * args.frames * (args.height // 32 // patch_h) * (args.width // 32 // patch_w)
    print(f"{args.config} {'train step' if args.train else 'forward'} {args.dtype}, batch {args.batch} x "
          f"{args.frames} latent frames at {args.height}x{args.width} ({tokens} tokens), mesh "
          f"{format_mesh(sizes)} on {jax.device_count()} {jax.devices()[0].platform} devices; compiled in "
          f"{seconds:.1f} s, not run")
    print(f"  per device: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{memory.temp_size_in_bytes / 2**30:.2f} GiB, outputs {memory.output_size_in_bytes / 2**30:.2f} GiB, "
          f"{float(cost.get('flops', 0.0)) / 1e12:.2f} TFLOP")
    print(f"temp_bytes_per_device={memory.temp_size_in_bytes} argument_bytes_per_device={memory.argument_size_in_bytes} "
          f"flops_per_device={int(float(cost.get('flops', 0.0)))}")


if __name__ == "__main__":
    main()
