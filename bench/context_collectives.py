"""Collective bytes per layer of each context-parallel implementation, read from the compiled HLO (compile only).

For each block kind (GDN, softmax) and each `context_impl`, a one-block DiT of the chosen preset is compiled for a
mesh of --context fake CPU devices (frames sharded, parameters replicated), and the output bytes of every collective
in the partitioned program (all-gather, all-to-all, collective-permute, all-reduce, reduce-scatter) are summed per
device. Collectives inside rolled loops are counted once (the GDN scans of more than 16 frames per device and the
query blocks of the XLA softmax are loops; none of the context-parallel collectives is inside one). One line per case:

    kind=gdn impl=allgather context=4 frames=21 collective_bytes_per_device=N (all-gather=N, ...)

    python bench/context_collectives.py [--preset sana_wm_2.6b --frames 21 --height 22 --width 40 --context 4]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
INSTRUCTION = re.compile(r"=\s*(\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> Counter:
    """{collective: bytes of its results} over the instructions of a partitioned HLO module (per device)."""
    totals = Counter()
    for result, op in INSTRUCTION.findall(hlo_text):
        for dtype, dims in SHAPE.findall(result):
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            totals[op] += size * DTYPE_BYTES.get(dtype, 4)
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sana_wm_2.6b")
    parser.add_argument("--frames", type=int, default=21, help="latent frames")
    parser.add_argument("--height", type=int, default=22, help="latent height")
    parser.add_argument("--width", type=int, default=40, help="latent width")
    parser.add_argument("--context", type=int, default=4, help="devices on the context axis")
    parser.add_argument("--mode", default="bidirectional", choices=("bidirectional", "chunk_causal"))
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.context}".strip()

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from sanawm_jax.models.sana_wm.config import get_config
    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs
    from sanawm_jax.ops.context_parallel import CONTEXT_IMPLS

    mesh = Mesh(np.asarray(jax.devices()[: args.context]), ("context",))
    for kind, every in (("gdn", 0), ("softmax", 1)):
        for impl in CONTEXT_IMPLS:
            config = get_config(args.preset, num_layers=1, softmax_every_n=every, chunk_plucker_post_attn_blocks=1,
                                mode=args.mode, context_impl=impl, dtype=args.dtype, param_dtype=args.dtype)
            params = abstract_params(config)
            inputs = jax.eval_shape(lambda: example_inputs(config, 1, args.frames, args.height, args.width, 300))
            with jax.set_mesh(mesh):
                compiled = jax.jit(SanaWMTransformer(config).apply).lower({"params": params}, **inputs).compile()
            totals = collective_bytes(compiled.as_text())
            detail = ", ".join(f"{op}={totals[op]}" for op in COLLECTIVES if totals[op])
            print(f"kind={kind} impl={impl} context={args.context} frames={args.frames} "
                  f"collective_bytes_per_device={sum(totals.values())} ({detail})", flush=True)


if __name__ == "__main__":
    main()
