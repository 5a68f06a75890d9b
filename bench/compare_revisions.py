"""JAX against JAX: the compiled DiT forward of two git revisions of this repository, timed interleaved in one process.

Each revision's `sanawm_jax` is exported (`git archive`) into a temporary directory as a package of its own name, so
both models are built side by side from the same random parameters and inputs (those of the first revision) and run
A, B, A, B, ... Besides the wall clock it records the process CPU time of every call (all threads): on a machine that
other jobs load, CPU time is far less disturbed than wall time, so a change can be judged while a diffusers ratio
cannot. The last line is `a_over_b_wall=R cpu=C` (medians of the per-repeat ratios; > 1: B is faster).
With `--sample-step` both sides run the sampling step of `bench/sample_step.py --configs small` instead (CFG batch 2,
random parameters; the model arguments are then ignored).

    python bench/compare_revisions.py main HEAD [--layers 4 --hidden 256 --head-dim 64 --frames 5 ...] [--repeats 9]
    python bench/compare_revisions.py main HEAD --sample-step [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from dit_forward import add_model_arguments, model_config_fields, random_inputs
from timing import machine_state, relative_spread, report_machine

ROOT = Path(__file__).resolve().parent.parent


def export_package(revision: str, name: str, into: Path) -> None:
    """Write `sanawm_jax` at `revision` to into/name, its absolute imports renamed to `name`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "sanawm_jax"], check=True,
                             capture_output=True).stdout
    staging = into / f"staging_{name}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(staging, filter="data")
    (staging / "sanawm_jax").rename(into / name)
    for path in (into / name).rglob("*.py"):
        path.write_text(path.read_text().replace("sanawm_jax", name))


def build_forward(package: str, args):
    """(jitted forward, config) of the model in `package`."""
    config_module = importlib.import_module(f"{package}.models.sana_wm.config")
    transformer = importlib.import_module(f"{package}.models.sana_wm.transformer")
    config = config_module.SanaWMConfig(**model_config_fields(args))
    return jax.jit(transformer.SanaWMTransformer(config).apply), transformer.init_params(config, jax.random.key(0)), config


def build_sample_step(package: str, params=None):
    """(step on the inputs of `sample_step.py`'s small case, parameters) in `package`; parameters are drawn when
    not given."""
    from sample_step import CASES, GUIDANCE_SCALE, NUM_STEPS, SHIFT, STEP_INDEX, make_inputs

    config_module = importlib.import_module(f"{package}.models.sana_wm.config")
    transformer = importlib.import_module(f"{package}.models.sana_wm.transformer")
    sampler = importlib.import_module(f"{package}.diffusion.sampler")
    scheduler = importlib.import_module(f"{package}.diffusion.scheduler")
    case = CASES["small"]
    config = config_module.SanaWMConfig.from_diffusers_config(case["model"])
    params = transformer.init_params(config, jax.random.key(0)) if params is None else params
    model = transformer.SanaWMTransformer(config)
    inputs = make_inputs(case, np.random.default_rng(0))
    conditioning = sampler.guidance_conditioning(
        inputs["text"], inputs["text_mask"], inputs["text"], inputs["text_mask"], inputs["camera_conditions"],
        inputs["chunk_plucker"], use_guidance=True,
    )
    sigmas = scheduler.flow_sigmas(NUM_STEPS, SHIFT)
    arguments = (jnp.asarray(inputs["latents"]), jnp.float32(scheduler.flow_timesteps(sigmas)[STEP_INDEX]),
                 jnp.asarray(sigmas), jnp.float32(GUIDANCE_SCALE), conditioning)
    step = jax.jit(lambda p, *a: sampler.denoise_step(model, p, *a, True))
    return (lambda: jax.block_until_ready(step(params, *arguments))), params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision_a")
    parser.add_argument("revision_b")
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sample-step", action="store_true", help="time the small sampling step, not the forward")
    args = parser.parse_args()
    before = machine_state()

    workdir = Path(tempfile.mkdtemp(prefix="compare_revisions_"))
    names = {"A": "revision_a_pkg", "B": "revision_b_pkg"}
    for side, revision in (("A", args.revision_a), ("B", args.revision_b)):
        export_package(revision, names[side], workdir)
    sys.path.insert(0, str(workdir))
    if args.sample_step:
        step_a, params = build_sample_step(names["A"])
        step_b, _ = build_sample_step(names["B"], params)
        calls = {"A": step_a, "B": step_b}
    else:
        forward_a, params, config = build_forward(names["A"], args)
        forward_b, _, _ = build_forward(names["B"], args)
        inputs = random_inputs(np.random.default_rng(0), args, config)
        calls = {"A": lambda: jax.block_until_ready(forward_a({"params": params}, **inputs)),
                 "B": lambda: jax.block_until_ready(forward_b({"params": params}, **inputs))}

    out_a, out_b = np.asarray(calls["A"]()), np.asarray(calls["B"]())  # also compiles both
    difference = np.linalg.norm(out_a - out_b) / np.linalg.norm(out_a)
    wall, cpu = {side: [] for side in calls}, {side: [] for side in calls}
    for _ in range(args.repeats):
        for side, call in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall[side].append(time.perf_counter() - start_wall)
            cpu[side].append(time.process_time() - start_cpu)

    if args.sample_step:
        work = "sampling step of sample_step.py's small case"
    else:
        work = (f"forward of {args.layers} layers, hidden {args.hidden}, head dim {args.head_dim}, latent "
                f"{args.frames}x{args.height}x{args.width}")
    print(f"A = {args.revision_a}, B = {args.revision_b}; {work}; {args.repeats} interleaved repeats")
    print(f"output difference: relative L2 {difference:.1e}")
    ratios = {}
    for label, times in (("wall", wall), ("cpu", cpu)):
        ratios[label] = [a / b for a, b in zip(times["A"], times["B"])]
        print(f"{label}: A {1e3 * statistics.median(times['A']):.1f} ms, B {1e3 * statistics.median(times['B']):.1f} ms, "
              f"A/B {statistics.median(ratios[label]):.3f} (spread {relative_spread(ratios[label]):.2f})")
    report_machine(before)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"a_over_b_wall={statistics.median(ratios['wall']):.3f} cpu={statistics.median(ratios['cpu']):.3f}")


if __name__ == "__main__":
    main()
