"""Checks that need several devices, run together in one Python process with fake CPU devices.

JAX fixes the device count when it starts, so `run_checks` starts a single process with
`--xla_force_host_platform_device_count=DEVICE_COUNT`, runs every function registered with `@check` (or, for the
slow tier, `@slow_check`) there and hands back what each returned (JSON-able measurements); the tests assert on
those. A check that raises reports its traceback instead, and only the tests reading that check fail.

    python tests/multi_device.py fast|slow RESULTS.json WORKDIR    # what run_checks launches

The embedded train.py data built once per session (the `demo_train_data` fixture) is at $DEMO_DATA_ENV.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

DEVICE_COUNT = 8
DEMO_DATA_ENV = "SANAWM_TEST_DEMO_DATA"
CHECKS = {"fast": {}, "slow": {}}
# Sharded runs of the forward: (mesh, batch size). fsdp=8 with batch 1 keeps the batch whole on every device;
# data=2 x fsdp=2 x tensor=2 splits a batch of 4 over data and fsdp and the heads and MLP channels over tensor.
FORWARD_MESHES = (({"fsdp": 8}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 4))
FORWARD_BATCH = max(batch for _, batch in FORWARD_MESHES)
# The demo's train.py runs compared against one device (see tests/test_parallel.py): 4 steps of batch 1 on fsdp=8
# (the batch kept whole on every device) and on fsdp=2,context=2,tensor=2 (3 latent frames padded to 4 over context 2).
TRAIN_STEPS = 4
TRAIN_MESHES = ("fsdp=8", "fsdp=2,context=2,tensor=2")


def check(fn):
    """Register `fn(workdir: Path) -> dict` to run in the fast tier's multi-device process."""
    CHECKS["fast"][fn.__name__] = fn
    return fn


def slow_check(fn):
    """Register `fn(workdir: Path) -> dict` for the slow tier's multi-device process."""
    CHECKS["slow"][fn.__name__] = fn
    return fn


def random_tree(abstract, seed: int):
    """Random values for every leaf of a ShapeDtypeStruct tree (vectors too, so biases and gates are non-zero)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in) * (1.0 if len(leaf.shape) >= 2 else 0.3)).astype(
            leaf.dtype)

    return jax.tree.map(draw, abstract)


def forward_inputs(config, batch: int, frames: int, height: int, width: int, seed: int = 0) -> dict:
    """Random model inputs (camera branch included, text mask with padding)."""
    import jax.numpy as jnp
    import numpy as np

    from sanawm_jax.models.sana_wm.transformer import example_inputs

    rng = np.random.default_rng(seed)
    shapes = example_inputs(config, batch=batch, frames=frames, height=height, width=width, text_len=5)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in shapes.items()}
    inputs["timesteps"] = jnp.asarray(rng.uniform(0, 1000, (batch, frames)), jnp.float32)
    inputs["text_mask"] = jnp.asarray(np.arange(5)[None, :] < rng.integers(2, 6, (batch, 1)), jnp.int32)
    camera = example_inputs(config, batch=batch, frames=frames)["camera_conditions"]
    inputs["camera_conditions"] = camera.at[..., 16:].set(jnp.array([3.0, 2.0, 1.5, 1.0]))
    return inputs


def sharded_forwards(config, params, all_inputs) -> dict:
    """For every mesh of FORWARD_MESHES: the relative L2 error of the sharded forward of the first `batch` examples of
    all_inputs against the single-device forward of all of them (one program; examples are independent), and the
    layout it ran with."""
    import jax
    import numpy as np

    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer
    from sanawm_jax.parallel import batch_shardings, format_mesh, make_mesh, param_shardings

    apply = jax.jit(SanaWMTransformer(config).apply)
    all_expected = np.asarray(apply({"params": params}, **all_inputs))
    results = {}
    for sizes, batch in FORWARD_MESHES:
        inputs = {name: value[:batch] for name, value in all_inputs.items()}
        expected = all_expected[:batch]
        mesh = make_mesh(sizes)
        sharded = jax.device_put(params, param_shardings(params, mesh))
        with jax.set_mesh(mesh):
            out = apply({"params": sharded}, **jax.device_put(inputs, batch_shardings(inputs, mesh)))
        block = sharded["blocks_0"]
        results[format_mesh(sizes)] = {
            "relative_l2": float(np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected)),
            "split_params": sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded)),
            "proj_spec": [str(axis) for axis in block["attn"]["proj"]["kernel"].sharding.spec],
            "point_conv_spec": [str(axis) for axis in block["mlp"]["point_conv"]["kernel"].sharding.spec],
            "output_batch_spec": str(out.sharding.spec[0]) if out.sharding.spec else "None",
        }
    return results


@check
def sharded_forward(workdir: Path) -> dict:
    """Two blocks (one linear, one softmax) of a widened tiny preset, params restored sharded from a checkpoint on
    the first mesh and placed on the others, against the single-device forward."""
    import jax

    from sanawm_jax import load_transformer, save_transformer
    from sanawm_jax.models.sana_wm.config import PRESETS
    from sanawm_jax.models.sana_wm.transformer import abstract_params
    from sanawm_jax.parallel import make_mesh, param_shardings

    # Wide enough that FSDP splits some parameters (the default threshold is 2^14 elements); 4 heads of 32.
    config = PRESETS["sana_wm_tiny"].replace(hidden_size=128, linear_head_dim=32, num_attention_heads=4, num_layers=2,
                                             softmax_every_n=2, chunk_plucker_post_attn_blocks=2)
    params = jax.device_put(random_tree(abstract_params(config), 0))
    save_transformer(workdir / "ckpt", params, config)
    mesh = make_mesh(FORWARD_MESHES[0][0])
    _, restored = load_transformer(workdir / "ckpt", sharding=param_shardings(abstract_params(config), mesh))
    restored_split = [leaf for leaf in jax.tree.leaves(restored) if not leaf.sharding.is_fully_replicated]
    results = sharded_forwards(config, params, forward_inputs(config, FORWARD_BATCH, 3, 2, 3))
    results["restored_split_params"] = len(restored_split)
    results["restored_shards"] = sorted({len(leaf.addressable_shards) for leaf in restored_split})
    return results


@check
def sharded_refiner_forward(workdir: Path) -> dict:
    """The refiner transformer with parameters saved in parts (as the release converter writes them) and restored
    sharded over four of the devices (fsdp=2 x tensor=2: heads and MLP channels over "tensor"), against its
    unsharded forward."""
    import jax
    import numpy as np

    from sanawm_jax.checkpoint import store
    from sanawm_jax.checkpoint.keymap import flatten
    from sanawm_jax.demo import random_params
    from sanawm_jax.models.refiner.checkpoint import abstract_refiner_params
    from sanawm_jax.models.refiner.config import REFINER_PRESETS
    from sanawm_jax.models.refiner.sampler import forward, frame_rope
    from sanawm_jax.models.refiner.transformer import RefinerTransformer
    from sanawm_jax.parallel import make_mesh, param_shardings

    # 4 heads of 32: the 128 x 128 projections reach the 2^14-element split threshold.
    config = REFINER_PRESETS["ltx2_refiner_tiny"].replace(num_attention_heads=4, attention_head_dim=32,
                                                          cross_attention_dim=128)
    abstract = abstract_refiner_params(config)
    params = jax.tree.map(np.asarray, random_params(abstract, np.random.default_rng(0)))
    flat = flatten(params)
    keys = sorted(flat)
    store.save_params_in_parts(workdir / "refiner", [{k: flat[k] for k in keys[i::2]} for i in range(2)],
                               config.to_dict())
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    sharded = store.restore_params(workdir / "refiner", abstract, param_shardings(abstract, mesh))
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((2, 12, config.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 5, config.caption_channels)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, (2, 12)).astype(np.float32)
    rope = frame_rope(config, [1, 2], 2, 3, 16.0)
    model = RefinerTransformer(config)
    expected = np.asarray(forward(model, params, tokens, text, timesteps, rope, None, None))
    out = np.asarray(forward(model, sharded, tokens, text, timesteps, rope, None, None))
    split = [leaf for leaf in jax.tree.leaves(sharded) if not leaf.sharding.is_fully_replicated]
    query = sharded["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].sharding.spec
    return {
        "split_params": len(split),
        "query_kernel_spec": [list(axis) if isinstance(axis, tuple) else axis for axis in query],
        "relative_l2": float(np.linalg.norm(out - expected) / np.linalg.norm(expected)),
    }


@slow_check
def train_on_meshes(workdir: Path) -> dict:
    """train.py on the embedded default data, batch 1, on each mesh of TRAIN_MESHES: {mesh: the losses of its
    metrics.jsonl, the mesh its train config records, latent frames per clip}."""
    import train
    from sanawm_jax.training.loop import read_run_configs
    from sanawm_jax.training.metrics import read_metrics
    from tests.test_train_cli import train_args

    results = {}
    for mesh in TRAIN_MESHES:
        run = workdir / mesh.replace(",", "_")
        records = train.main(train_args(Path(os.environ[DEMO_DATA_ENV]), run, "--steps", str(TRAIN_STEPS), "--mesh",
                                        mesh))
        results[mesh] = {"losses": [record["loss"] for record in read_metrics(run)],
                         "recorded_mesh": read_run_configs(run)[1].mesh,
                         "latent_frames": records[0]["tokens"] // 6}  # 2 x 3 latent pixels per frame, patch 1
    return results


@slow_check
def sharded_forward_2_6b_block(workdir: Path) -> dict:
    """One block of the 2.6B shape (2240 channels, 20 linear heads of 112, 20 cross heads, MLP 6720) on a 2-frame,
    2x2-token grid, softmax kind and GDN kind, against the single-device forward."""
    import jax

    from sanawm_jax.models.sana_wm.config import PRESETS
    from sanawm_jax.models.sana_wm.transformer import abstract_params

    results = {}
    for kind, softmax_every_n in (("gdn", 4), ("softmax", 1)):
        config = PRESETS["sana_wm_2.6b"].replace(num_layers=1, softmax_every_n=softmax_every_n,
                                                 chunk_plucker_post_attn_blocks=1)
        params = jax.device_put(random_tree(abstract_params(config), 1))
        results[kind] = sharded_forwards(config, params, forward_inputs(config, FORWARD_BATCH, 2, 2, 2))
    return results


def _context_inputs(config, frames, seed=0, valid_frames=None):
    """Random model inputs (batch 2, a 2x3 latent grid, camera branch on) of `frames` latent frames."""
    import jax.numpy as jnp
    import numpy as np

    from sanawm_jax.models.sana_wm.transformer import example_inputs

    rng = np.random.default_rng(seed)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
              for k, v in example_inputs(config, batch=2, frames=frames, height=2, width=3, text_len=5).items()}
    inputs["timesteps"] = jnp.asarray(rng.uniform(0, 1000, (2, frames)), jnp.float32)
    inputs["text_mask"] = jnp.ones((2, 5), jnp.int32).at[1, 3:].set(0)
    camera = example_inputs(config, batch=2, frames=frames)["camera_conditions"]
    camera = camera.at[..., 3].set(jnp.linspace(0, 0.5, frames)).at[..., 11].set(jnp.linspace(0, 0.2, frames))
    inputs["camera_conditions"] = camera.at[..., 16:].set(jnp.array([3.0, 2.0, 1.5, 1.0]))
    if valid_frames is not None:
        inputs["frame_valid_mask"] = jnp.asarray(np.arange(frames) < valid_frames, jnp.float32)[None].repeat(2, 0)
    return inputs


def _context_forward_errors(config, frames, cases, valid_frames=None):
    """{"ctx=C impl mode": relative L2 of the forward (`random_tree` parameters) on a mesh against one device}.
    cases: (context size, impl, mode); a context of 2 runs on an ("fsdp", "context") = (2, 2) mesh with the batch
    split over fsdp, so the frame-parallel layers also run beside an automatically partitioned axis."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params

    params = jax.device_put(random_tree(abstract_params(config), 0))
    inputs = _context_inputs(config, frames, valid_frames=valid_frames)
    errors = {}
    for mode in sorted({mode for _, _, mode in cases}):
        model = SanaWMTransformer(config.replace(mode=mode))
        expected = np.asarray(jax.jit(model.apply)({"params": params}, **inputs))
        for size, impl, case_mode in cases:
            if case_mode != mode:
                continue
            model = SanaWMTransformer(config.replace(mode=mode, context_impl=impl))
            if size == 2:
                mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("fsdp", "context"))
                batch = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec("fsdp")))
            else:
                mesh, batch = Mesh(np.asarray(jax.devices()[:size]), ("context",)), inputs
            with jax.set_mesh(mesh):
                out = np.asarray(jax.jit(model.apply)({"params": params}, **batch))
            errors[f"ctx={size} {impl} {mode}"] = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
    return errors


CONTEXT_IMPLS = ("allgather", "ring", "ulysses")


def _context_op_errors(gdn_cases, softmax_impls, size=4, t=7) -> dict:
    """The frame-level GDN (values and gradients) and softmax attention (key mask and chunk segments) on t frames
    sharded over `size` devices, against the single-device ops: {case: max abs error / max abs reference}.
    gdn_cases: (impl, chunk-causal?, main branch?) triples; softmax_impls: implementations, each chunk-causal."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from sanawm_jax.models.sana_wm import chunks
    from sanawm_jax.ops.attention import dot_product_attention
    from sanawm_jax.ops.context_parallel import ContextLayout, dot_product_attention_cp, frame_gdn_cp
    from sanawm_jax.ops.gdn import frame_gdn

    b, s, h, d = 2, 3, 4, 8
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q_rot, k_rot, v = (0.3 * normal(b, t, s, h, d) for _ in range(3))
    q, k = (jnp.abs(0.3 * normal(b, t, s, h, d)) for _ in range(2))
    beta, decay = jax.nn.sigmoid(normal(b, t, s, h)), jax.nn.sigmoid(normal(b, t, h) + 2.0)
    layout_starts = chunks.chunk_starts(t, 2)  # t = 7: chunks 0-2, 3-4, 5-6
    starts = chunks.start_mask(layout_starts, t)
    cotangent = normal(b, t, s, h, d)
    mesh = Mesh(np.asarray(jax.devices()[:size]), ("context",))
    relative = lambda out, ref: float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    errors = {}
    for impl, chunked, main_branch in gdn_cases:
        layout = ContextLayout(size, t, impl)
        inputs = (q_rot, k_rot, v, beta, decay) + ((q, k) if main_branch else ())
        chunk_starts = starts if chunked else None
        padded_starts = None if chunk_starts is None else np.pad(chunk_starts, (0, layout.padded_frames - t))

        def single(*args):
            out = frame_gdn(*args, chunk_starts=chunk_starts)
            return jnp.sum(out * cotangent), out

        def sharded(*args):
            out = frame_gdn_cp(layout, frame_gdn, *(layout.pad(a) for a in args), chunk_starts=padded_starts)[:, :t]
            return jnp.sum(out * cotangent), out

        argnums = tuple(range(len(inputs)))
        grads, expected = jax.jit(jax.grad(single, argnums, has_aux=True))(*inputs)
        with jax.set_mesh(mesh):
            sharded_grads, out = jax.jit(jax.grad(sharded, argnums, has_aux=True))(*inputs)
        name = f"gdn {impl} {'chunk_causal' if chunked else 'bidirectional'} {'main' if main_branch else 'camera'}"
        errors[name] = relative(out, expected)
        errors[name + " grad"] = max(relative(g, r) for g, r in zip(sharded_grads, grads))

    n = t * s
    query, key, value = (normal(b, n, h, d) for _ in range(3))
    key_mask = jnp.asarray(rng.uniform(size=(b, 1, 1, n)) > 0.3)
    ids = chunks.chunk_ids(layout_starts, t).repeat(s)
    attention_cotangent = normal(b, n, h, d)
    with_loss = lambda attend: lambda *qkv: (jnp.sum(attend(*qkv) * attention_cotangent), attend(*qkv))
    grads, expected = jax.grad(with_loss(lambda q_, k_, v_: dot_product_attention(
        q_, k_, v_, scale=0.3, key_mask=key_mask, segments=(ids, ids))), (0, 1, 2), has_aux=True)(query, key, value)
    for impl in softmax_impls:
        layout = ContextLayout(size, t, impl)
        n_pad = layout.padded_frames * s
        pad = lambda a: jnp.pad(a, ((0, 0),) * (a.ndim - 3) + ((0, n_pad - n),) + ((0, 0),) * 2)
        padded_ids = np.pad(ids, (0, n_pad - n), mode="edge")
        mask = jnp.pad(key_mask, ((0, 0), (0, 0), (0, 0), (0, n_pad - n)))
        sharded = lambda q_, k_, v_: dot_product_attention_cp(
            layout, pad(q_), pad(k_), pad(v_), scale=0.3, key_mask=mask, segments=(padded_ids, padded_ids))[:, :n]
        with jax.set_mesh(mesh):
            sharded_grads, out = jax.jit(jax.grad(with_loss(sharded), (0, 1, 2), has_aux=True))(query, key, value)
        errors[f"softmax {impl} chunk_causal"] = relative(out, expected)
        errors[f"softmax {impl} chunk_causal grad"] = max(relative(g, r) for g, r in zip(sharded_grads, grads))
    return errors


@check
def context_parallel_bf16_gradients(workdir: Path) -> dict:
    """Gradients in bfloat16 of the context-parallel softmax attention (K/V all-gather) and of cross-attention to
    keys every device holds, on an ("fsdp", "context") = (2, 2) mesh with the batch split over fsdp (the shard_maps
    manual over context only), against the float32 single-device gradients: {case: max abs error / max abs
    reference}. XLA's CPU compiler aborted on both programs while their gradient sums over the devices were bf16
    reductions ("Invalid binary instruction opcode copy")."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sanawm_jax.ops.attention import dot_product_attention
    from sanawm_jax.ops.context_parallel import ContextLayout, dot_product_attention_cp, local_attention_cp

    rng = np.random.default_rng(2)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b, frames, s, h, d, text = 2, 4, 3, 2, 8, 5
    query, key, value = (normal(b, frames * s, h, d) for _ in range(3))
    text_key, text_value = normal(b, text, h, d), normal(b, text, h, d)
    cotangent = normal(b, frames * s, h, d)
    layout = ContextLayout(2, frames)
    cases = {
        "softmax allgather": (lambda q_, k_, v_: dot_product_attention_cp(layout, q_, k_, v_, scale=0.3),
                              lambda q_, k_, v_: dot_product_attention(q_, k_, v_, scale=0.3), (query, key, value)),
        "cross-attention": (lambda q_, k_, v_: local_attention_cp(layout, q_, k_, v_, scale=0.3),
                            lambda q_, k_, v_: dot_product_attention(q_, k_, v_, scale=0.3),
                            (query, text_key, text_value)),
    }
    loss = lambda attend: lambda *qkv: jnp.sum(attend(*qkv).astype(jnp.float32) * cotangent)
    errors = {}
    for name, (sharded, single, inputs) in cases.items():
        expected = jax.grad(loss(single), (0, 1, 2))(*inputs)
        mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("fsdp", "context"))
        batch = NamedSharding(mesh, PartitionSpec("fsdp"))
        with jax.set_mesh(mesh):
            bf16_inputs = [jax.device_put(a.astype(jnp.bfloat16), batch) for a in inputs]
            grads = jax.jit(jax.grad(loss(sharded), (0, 1, 2)))(*bf16_inputs)
        errors[name] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
                           for g, r in zip(grads, expected))
    return errors


@check
def context_parallel_ops(workdir: Path) -> dict:
    """7 frames over 4 devices (padded to 8): GDN state passing (chunk-causal, main branch) and Ulysses
    (bidirectional, camera branch) with gradients; softmax by every implementation; frame halos reaching two
    devices, wider than the clip, and narrower than a device's frames."""
    errors = _context_op_errors([("allgather", True, True), ("ulysses", False, False)], CONTEXT_IMPLS)
    errors.update(_halo_conv_errors([(4, 7, 3), (2, 2, 3), (2, 7, 1)]))
    return errors


def _halo_conv_errors(cases) -> dict:
    """A depthwise "same" conv of reach r along frames run on `frame_blocks` (halos) against the whole clip, for
    (devices, frames, r) cases: {case: max abs error / max abs reference}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from sanawm_jax.models.sana_wm.layers import depthwise_conv
    from sanawm_jax.ops.context_parallel import ContextLayout, frame_blocks, unblock

    rng = np.random.default_rng(1)
    errors = {}
    for size, t, reach in cases:
        layout = ContextLayout(size, t)
        x = jnp.asarray(rng.standard_normal((2, t, 3, 5)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((2 * reach + 1, 1, 5)), jnp.float32)
        expected = depthwise_conv(x, kernel)
        conv = lambda x: unblock(layout, depthwise_conv(frame_blocks(layout, layout.pad(x), reach), kernel), reach)
        with jax.set_mesh(Mesh(np.asarray(jax.devices()[:size]), ("context",))):
            out = jax.jit(conv)(x)[:, :t]
        errors[f"halo ctx={size} frames={t} reach={reach}"] = float(jnp.max(jnp.abs(out - expected))
                                                                    / jnp.max(jnp.abs(expected)))
    return errors


@check
def context_parallel_forward(workdir: Path) -> dict:
    """The chunk-causal DiT (one GDN and one softmax block, tiny width) with its 7 frames (the last one marked
    invalid by frame_valid_mask) sharded over a "context" axis of 4 devices (padded to 8: two frames per device, so
    the short conv's halo of 3 frames spans two neighbours), against one device."""
    from sanawm_jax.models.sana_wm.config import PRESETS

    config = PRESETS["sana_wm_tiny"].replace(num_layers=2, softmax_every_n=2, chunk_plucker_post_attn_blocks=2)
    return _context_forward_errors(config, 7, [(4, "allgather", "chunk_causal")], valid_frames=6)


def _mesh_memory_lowering(num_layers: int):
    """The program bench/mesh_memory.py compiles, at the tiny width: the bf16 forward of `num_layers` blocks (ring
    softmax and GDN state passing) from abstract parameters and inputs sharded on fsdp=2,context=4, 5 frames of a 1x1
    latent grid (padded to 8); lowered, not compiled."""
    import jax
    from jax.sharding import NamedSharding

    from sanawm_jax.models.sana_wm.config import PRESETS
    from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params, example_inputs
    from sanawm_jax.parallel import batch_spec, make_mesh, param_shardings

    config = PRESETS["sana_wm_tiny"].replace(num_layers=num_layers, chunk_plucker_post_attn_blocks=num_layers,
                                             dtype="bfloat16", param_dtype="bfloat16", context_impl="ring")
    mesh = make_mesh({"fsdp": 2, "context": 4})
    placed = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    params = abstract_params(config)
    params = jax.tree.map(placed, params, param_shardings(params, mesh))
    inputs = jax.eval_shape(lambda: example_inputs(config, batch=1, frames=5, height=1, width=1, text_len=4))
    inputs = jax.tree.map(lambda a: placed(a, NamedSharding(mesh, batch_spec(a.shape, mesh))), inputs)
    model = SanaWMTransformer(config)
    with jax.set_mesh(mesh):
        return jax.jit(lambda p, x: model.apply({"params": p}, **x)).lower(params, inputs)


@check
def context_parallel_lowering(workdir: Path) -> dict:
    """Partition ids and manual (shard_map) regions in the lowered program of `_mesh_memory_lowering` (4 blocks).
    XLA's SPMD partitioner rejects the partition id that `lax.axis_index` lowers to inside a shard_map whose other
    mesh axes are automatic (from 8 such blocks on: `context_parallel_compile`)."""
    text = _mesh_memory_lowering(4).as_text()
    return {"partition_ids": text.count("partition_id"), "manual_computations": text.count("sdy.manual_computation")}


@slow_check
def context_parallel_compile(workdir: Path) -> dict:
    """The program of `context_parallel_lowering` with 8 blocks compiled (not run): XLA's per-device temporary
    bytes."""
    return {"temp_bytes": _mesh_memory_lowering(8).compile().memory_analysis().temp_size_in_bytes}


@slow_check
def context_parallel_forward_all(workdir: Path) -> dict:
    """The DiT of the fast check (two blocks, tiny width) on 7 frames over 2 (beside fsdp = 2) and 4 devices: every
    implementation in both modes at least once with the fast check; the GDN op with gradients over 2 devices; and
    two 2.6B-wide blocks (20 heads of 112, one GDN and one softmax) on a 2x3 latent grid over 4 devices."""
    from sanawm_jax.models.sana_wm.config import PRESETS

    two_blocks = dict(num_layers=2, softmax_every_n=2, chunk_plucker_post_attn_blocks=2)
    cases = [(2, "allgather", "bidirectional"), (2, "ring", "chunk_causal"), (2, "ulysses", "bidirectional"),
             (4, "ring", "bidirectional"), (4, "ulysses", "chunk_causal")]
    errors = _context_forward_errors(PRESETS["sana_wm_tiny"].replace(**two_blocks), 7, cases)
    errors.update(_context_op_errors([("allgather", False, False), ("ulysses", True, True)], (), size=2))
    wide = PRESETS["sana_wm_2.6b"].replace(**two_blocks)
    wide_errors = _context_forward_errors(wide, 7, [(4, "allgather", "chunk_causal")])
    errors.update({f"2.6b-wide {k}": v for k, v in wide_errors.items()})
    return errors


@slow_check
def context_parallel_sample(workdir: Path) -> dict:
    """`sample.py --num-frames 41` (the embedded demo: 6 latent frames) on one device (a process of its own) and
    here with `--mesh fsdp=2,context=4` (frames padded to 8), also with `--context-impl ulysses`: relative L2
    distances of the sampled latents to the single-device ones. Registered last: sample.py leaves its mesh set."""
    import numpy as np

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import sample

    argv = lambda name: ["--num-frames", "41", "--no-compilation-cache", "--out", str(workdir / f"{name}.mp4")]
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
    subprocess.run([sys.executable, str(root / "sample.py"), *argv("single")], check=True, capture_output=True,
                   env=dict(os.environ, XLA_FLAGS=" ".join(flags)), timeout=1200)  # one device
    runs = {"allgather": ["--mesh", "fsdp=2,context=4"],
            "ulysses": ["--mesh", "fsdp=2,context=4", "--context-impl", "ulysses"]}
    for name, mesh_flags in runs.items():
        sample.main([*argv(name), *mesh_flags])
    latents = {}
    for name in ("single", *runs):
        with np.load(workdir / f"{name}.latents.npz") as saved:
            latents[name] = saved["latents"]
    single = latents.pop("single")
    return {"shape": list(single.shape),
            **{name: float(np.linalg.norm(out - single) / np.linalg.norm(single)) for name, out in latents.items()}}


def main(tier: str, results_path: str, workdir: str) -> None:
    import jax

    if jax.device_count() != DEVICE_COUNT:
        raise RuntimeError(f"expected {DEVICE_COUNT} fake CPU devices, JAX has {jax.device_count()}")
    results = {}
    for name, fn in CHECKS[tier].items():
        (Path(workdir) / name).mkdir(parents=True, exist_ok=True)
        try:
            results[name] = {"result": fn(Path(workdir) / name)}
        except Exception:  # reported to the tests that read this check
            results[name] = {"error": traceback.format_exc()}
    Path(results_path).write_text(json.dumps(results))


def run_checks(tier: str, workdir: Path, demo_data: Path) -> dict:
    """{check name: {"result": ...} or {"error": traceback}} of the `tier` ("fast" or "slow") checks, from one process
    with DEVICE_COUNT CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICE_COUNT}".strip()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **{DEMO_DATA_ENV: str(demo_data)},
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    results_path = Path(workdir) / "results.json"
    run = subprocess.run([sys.executable, __file__, tier, str(results_path), str(workdir)], env=env,
                         capture_output=True, text=True, timeout=1200)
    if run.returncode:
        raise RuntimeError(f"the multi-device process failed:\n{run.stderr[-3000:]}")
    return json.loads(results_path.read_text())


if __name__ == "__main__":
    main(*sys.argv[1:])
