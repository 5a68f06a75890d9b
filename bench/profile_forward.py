"""Where the compiled DiT forward spends its wall time, from XLA's own per-thunk trace, against the machine's matmul
speed.

The forward is compiled with XLA's per-thunk trace events on (`xla_cpu_enable_xprof_traceme`), run --repeats times
under `jax.profiler`, and every moment of each run is charged to the thunks executing then on XLA's CPU threads: to
the one thunk when it runs alone (a large matmul then uses both cores inside it), shared equally when several run
at once. Thunks are grouped by the model module in their HLO metadata (`blocks_N` folded into `blocks`), so the table
is the forward's wall time by module (`--depth`: how many components of the module path a row keeps; 6 splits the
attention and GDN ops into their parts). The floor line divides the compiled program's FLOPs (XLA's cost analysis,
which counts a `while` body once: attention query loops are undercounted) by the speed of one large matmul measured
here, i.e. the time the forward would take if every FLOP ran at dense-matmul speed.

    python bench/profile_forward.py [--layers 4 --hidden 512 --head-dim 64 --frames 5 --height 11 --width 20]
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from dit_forward import add_model_arguments, model_config_fields, random_inputs
from jax.profiler import ProfileData
from timing import machine_state, report_machine

from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, init_params

RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end:", "while")  # not thunks' work
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = ")
OP_NAME = re.compile(r"metadata=\{op_name=\"([^\"]*)\"")
CALLS = re.compile(r"(?:calls|body|to_apply)=%([\w.\-]+)")


def module_of(op_name: str, depth: int = 3) -> str:
    """'jit(apply)/SanaWMTransformer/blocks_2/mlp/jit(silu)/div' -> 'blocks/mlp/div'."""
    op_name = re.sub(r"^jit\([^)]*\)/SanaWMTransformer[./]", "", op_name)
    parts = [re.sub(r"^blocks_\d+$", "blocks", p) for p in op_name.split("/") if not p.startswith("jit(")]
    return "/".join(parts[:depth]) or "(top level)"


def thunk_modules(hlo_text: str, depth: int = 3) -> dict[str, str]:
    """HLO instruction name -> module, from the compiled program's metadata. An instruction without metadata of its
    own takes that of the first instruction inside the computation it calls (fusions), else that of the instruction
    calling its computation (`while` bodies)."""
    own, home, callee, caller, first_inside, computation = {}, {}, {}, {}, {}, None
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        instruction = INSTRUCTION.match(line)
        if instruction is None:
            continue
        name, op_name = instruction.group(1), OP_NAME.search(line)
        home[name] = computation
        if op_name:
            own[name] = module_of(op_name.group(1), depth)
            first_inside.setdefault(computation, own[name])
        for called in CALLS.findall(line):
            callee[name] = callee.get(name, called)
            caller[called] = name
    modules = dict(own)
    for name in home:
        if name not in modules and callee.get(name) in first_inside:
            modules[name] = first_inside[callee[name]]
    for name, computation in home.items():
        while name not in modules and computation in caller:  # up through calls and while bodies
            enclosing = caller[computation]
            if enclosing in own:
                modules[name] = own[enclosing]
            computation = home.get(enclosing)
    return modules


def wall_by_module(trace_dir: Path, modules: dict[str, str]) -> tuple[collections.Counter, float]:
    """Nanoseconds of wall time per module (alone, or an equal share when thunks overlap) over the whole trace, and
    the nanoseconds when no thunk ran."""
    path = max(trace_dir.rglob("*.xplane.pb"))
    events = []  # (time, +1 start / -1 end, thunk)
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(RUNTIME_EVENTS):
                    events += [(event.start_ns, 1, event.name), (event.start_ns + event.duration_ns, -1, event.name)]
    if not events:
        raise RuntimeError(f"no XLA thunk events in {path}: this jaxlib does not trace CPU thunks")
    events.sort()
    running: collections.Counter = collections.Counter()
    wall: collections.Counter = collections.Counter()
    idle, last = 0.0, events[0][0]
    for now, change, thunk in events:
        active = list(running.elements())
        if now > last:
            for name in active:
                wall[modules.get(name, "(no metadata: " + name.split(".")[0] + ")")] += (now - last) / len(active)
            idle += (now - last) if not active else 0
        running[thunk] += change
        last = now
    return wall, idle


def matmul_speed(tokens: int, hidden: int, repeats: int = 15) -> float:
    """FLOP/s of one (tokens x hidden) @ (hidden x 6 hidden) float32 matmul, jitted (median of repeats)."""
    a, b = jnp.ones((tokens, hidden)), jnp.ones((hidden, 6 * hidden))
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * tokens * hidden * 6 * hidden / float(np.median(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30, help="modules shown, largest first")
    parser.add_argument("--depth", type=int, default=3, help="module path components kept (more: finer rows)")
    args = parser.parse_args()
    before = machine_state()

    config = SanaWMConfig(**model_config_fields(args))
    params = init_params(config, jax.random.key(0))
    inputs = random_inputs(np.random.default_rng(0), args, config)
    model = SanaWMTransformer(config)
    lowered = jax.jit(lambda p, x: model.apply({"params": p}, **x)).lower(params, inputs)
    compiled = lowered.compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
    run = lambda: jax.block_until_ready(compiled(params, inputs))
    for _ in range(2):
        run()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        jax.profiler.stop_trace()
        wall, idle = wall_by_module(Path(trace_dir), thunk_modules(compiled.as_text(), args.depth))

    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    tokens = args.frames * args.height * args.width
    speed = matmul_speed(tokens, args.hidden)
    forward_ms = 1e3 * float(np.median(seconds))
    traced_ms = sum(wall.values()) / 1e6 / args.repeats
    print(f"config: {args.layers} layers, hidden {args.hidden}, head dim {args.head_dim}, "
          f"latent {args.frames}x{args.height}x{args.width} ({tokens} tokens); {args.repeats} traced runs")
    print(f"forward: {forward_ms:.1f} ms (median of the traced runs); per run on average, some thunk ran "
          f"{traced_ms:.1f} ms and none {idle / 1e6 / args.repeats:.1f} ms")
    print(f"floor: {flops / 1e9:.1f} GFLOP (cost analysis) at {speed / 1e9:.0f} GFLOP/s (one {tokens}x{args.hidden}x"
          f"{6 * args.hidden} matmul) = {1e3 * flops / speed:.1f} ms, {1e3 * flops / speed / forward_ms:.0%} of the "
          "forward")
    print("| module | ms per forward | % of the traced time |")
    print("|---|---|---|")
    for module, ns in wall.most_common(args.rows):
        ms = ns / 1e6 / args.repeats
        print(f"| {module} | {ms:.2f} | {100 * ms / traced_ms:.1f} |")
    report_machine(before)


if __name__ == "__main__":
    main()
