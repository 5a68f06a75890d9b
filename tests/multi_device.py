"""Checks that need several devices, run together in one Python process with fake CPU devices.

JAX fixes the device count when it starts, so `run_checks` starts a single process with
`--xla_force_host_platform_device_count=DEVICE_COUNT`, runs every function registered with `@check` there and hands
back what each returned (JSON-able measurements); the tests assert on those. A check that raises reports its
traceback instead, and only the tests reading that check fail.

    python tests/multi_device.py RESULTS.json WORKDIR    # what run_checks launches
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

DEVICE_COUNT = 4
CHECKS = {}


def check(fn):
    """Register `fn(workdir: Path) -> dict` to run in the multi-device process."""
    CHECKS[fn.__name__] = fn
    return fn


@check
def sharded_forward(workdir: Path) -> dict:
    """A ("data", "fsdp") = (2, 2) mesh: FSDP-sharded params restored from a checkpoint and a batch split over all
    four devices, against the unsharded forward of the same params and inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sanawm_jax import load_transformer, save_transformer
    from sanawm_jax.models.sana_wm.config import PRESETS
    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs, init_params
    from sanawm_jax.parallel import batch_sharding, fsdp_shardings, make_mesh

    # Wide enough that FSDP splits some parameters (the default threshold is 2^14 elements); two blocks, one linear
    # and one softmax, keep both block kinds at half the compile time of the tiny preset's four.
    config = PRESETS["sana_wm_tiny"].replace(hidden_size=128, linear_head_dim=32, num_attention_heads=4, num_layers=2,
                                             softmax_every_n=2, chunk_plucker_post_attn_blocks=2)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
              for k, v in example_inputs(config, batch=4, frames=3, height=2, width=3, text_len=5).items()}
    inputs["timesteps"] = jnp.asarray(rng.uniform(0, 1000, (4, 3)), jnp.float32)
    inputs["text_mask"] = jnp.ones((4, 5), jnp.int32)
    camera = example_inputs(config, batch=4, frames=3)["camera_conditions"]
    inputs["camera_conditions"] = camera.at[..., 16:].set(jnp.array([3.0, 2.0, 1.5, 1.0]))
    apply = jax.jit(SanaWMTransformer(config).apply)
    expected = np.asarray(apply({"params": params}, **inputs))

    mesh = make_mesh(data=2, fsdp=2)
    save_transformer(workdir / "ckpt", params, config)
    _, sharded = load_transformer(workdir / "ckpt", sharding=fsdp_shardings(abstract_params(config), mesh))
    split = [leaf for leaf in jax.tree.leaves(sharded) if not leaf.sharding.is_fully_replicated]
    out = apply({"params": sharded}, **jax.device_put(inputs, batch_sharding(mesh)))
    return {
        "split_params": len(split),
        "shards_per_split_param": sorted({len(leaf.addressable_shards) for leaf in split}),
        "output_batch_axes": list(out.sharding.spec[0]),
        "output_shape": list(out.shape),
        "expected_shape": list(expected.shape),
        "relative_l2": float(np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected)),
    }


@check
def sharded_refiner_forward(workdir: Path) -> dict:
    """The refiner transformer with parameters saved in parts (as the release converter writes them) and restored
    FSDP-sharded over all four devices, against its unsharded forward."""
    import jax
    import numpy as np

    from sanawm_jax.checkpoint import store
    from sanawm_jax.checkpoint.keymap import flatten
    from sanawm_jax.demo import random_params
    from sanawm_jax.models.refiner.checkpoint import abstract_refiner_params
    from sanawm_jax.models.refiner.config import REFINER_PRESETS
    from sanawm_jax.models.refiner.sampler import forward, frame_rope
    from sanawm_jax.models.refiner.transformer import RefinerTransformer
    from sanawm_jax.parallel import fsdp_shardings, make_mesh

    # 4 heads of 32: the 128 x 128 projections reach FSDP's 2^14-element threshold.
    config = REFINER_PRESETS["ltx2_refiner_tiny"].replace(num_attention_heads=4, attention_head_dim=32,
                                                          cross_attention_dim=128)
    abstract = abstract_refiner_params(config)
    params = jax.tree.map(np.asarray, random_params(abstract, np.random.default_rng(0)))
    flat = flatten(params)
    keys = sorted(flat)
    store.save_params_in_parts(workdir / "refiner", [{k: flat[k] for k in keys[i::2]} for i in range(2)],
                               config.to_dict())
    sharded = store.restore_params(workdir / "refiner", abstract, fsdp_shardings(abstract, make_mesh(data=1, fsdp=4)))
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((2, 12, config.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 5, config.caption_channels)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, (2, 12)).astype(np.float32)
    rope = frame_rope(config, [1, 2], 2, 3, 16.0)
    model = RefinerTransformer(config)
    expected = np.asarray(forward(model, params, tokens, text, timesteps, rope, None, None))
    out = np.asarray(forward(model, sharded, tokens, text, timesteps, rope, None, None))
    split = [leaf for leaf in jax.tree.leaves(sharded) if not leaf.sharding.is_fully_replicated]
    return {
        "split_params": len(split),
        "shards_per_split_param": sorted({len(leaf.addressable_shards) for leaf in split}),
        "relative_l2": float(np.linalg.norm(out - expected) / np.linalg.norm(expected)),
    }


def main(results_path: str, workdir: str) -> None:
    import jax

    if jax.device_count() != DEVICE_COUNT:
        raise RuntimeError(f"expected {DEVICE_COUNT} fake CPU devices, JAX has {jax.device_count()}")
    results = {}
    for name, fn in CHECKS.items():
        (Path(workdir) / name).mkdir(parents=True, exist_ok=True)
        try:
            results[name] = {"result": fn(Path(workdir) / name)}
        except Exception:  # reported to the tests that read this check
            results[name] = {"error": traceback.format_exc()}
    Path(results_path).write_text(json.dumps(results))


def run_checks(workdir: Path) -> dict:
    """{check name: {"result": ...} or {"error": traceback}} from one process with DEVICE_COUNT CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICE_COUNT}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    results_path = Path(workdir) / "results.json"
    run = subprocess.run([sys.executable, __file__, str(results_path), str(workdir)], env=env, capture_output=True,
                         text=True, timeout=1200)
    if run.returncode:
        raise RuntimeError(f"the multi-device process failed:\n{run.stderr[-3000:]}")
    return json.loads(results_path.read_text())


if __name__ == "__main__":
    main(*sys.argv[1:])
