"""Where the compiled DiT forward spends its time on this machine: every part timed as its own jitted program.

Each part is the model's own module (or op) applied to the parameters of one block and to random inputs of the shapes
it sees in the forward; the parts run interleaved round-robin (median of --repeats) and are multiplied by how often
the forward runs them (GDN parts by the number of GDN blocks, ...). Whole blocks and the whole forward are timed the
same way, so the table shows what each part costs and how much the parts leave unexplained (fusion across part
boundaries, elementwise glue: modulation, LayerNorm, masks, residuals).

    python bench/breakdown.py [--layers 4 --hidden 256 --head-dim 64 --frames 5 --height 11 --width 20]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from dit_forward import add_model_arguments, model_config_fields, random_inputs
from timing import interleaved, machine_state, report_machine

from sanawm_jax.models.sana_wm import ucpe
from sanawm_jax.models.sana_wm.attention import DualBranchAttention
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.layers import (
    CaptionEmbedder,
    CrossAttention,
    GLUMBConvTemp,
    LinearPatches,
    PatchEmbed,
    PatchProjection,
    RMSNorm,
    TemporalShortConv,
    TimestepEmbedder,
    apply_rope,
    dense,
    rotary_tables,
)
from sanawm_jax.models.sana_wm.transformer import FinalLayer, SanaWMBlock, SanaWMTransformer, init_params
from sanawm_jax.ops.gdn import frame_gdn

EMBEDDING = "embedding (patchify, timestep, caption, rope, ray transforms)"
FINAL, FORWARD = "final layer", "whole forward"
GDN_PROJECTIONS = ("qkv", "q_proj_cam", "k_proj_cam", "v_proj_cam", "out_proj_cam", "output_gate", "proj")


def apply(module, method=None):
    """The module as a function of (params, *args)."""
    return lambda params, *args, **kwargs: module.apply({"params": params}, *args, method=method, **kwargs)


def jit(fn, *args, **kwargs):
    """A no-argument call of jit(fn) on fixed arguments (parameters are arguments, not compile-time constants)."""
    compiled = jax.jit(fn)
    return lambda: compiled(*args, **kwargs)


def parts(config, params, inputs):
    """name -> (function of no arguments returning a jax value, times per forward). One GDN and one softmax block
    (the first of each kind) stand for all blocks of their kind."""
    cfg = config
    b, t, h, w, _ = inputs["latents"].shape
    s, c = h * w, cfg.hidden_size
    heads, d = cfg.self_attention_heads, cfg.linear_head_dim
    grid = (t, h, w)
    rng = np.random.default_rng(1)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), cfg.compute_dtype)
    dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
    layers = range(cfg.num_layers)
    gdn_index = next(i for i in layers if not cfg.is_softmax_block(i))
    softmax_index = next((i for i in layers if cfg.is_softmax_block(i)), None)
    num_softmax = sum(cfg.is_softmax_block(i) for i in layers)
    num_gdn = cfg.num_layers - num_softmax
    num_plucker = sum(cfg.has_plucker_proj(i) for i in layers)

    x = normal(b, t, s, c)
    text = normal(b, inputs["text"].shape[1], c)
    text_mask = jnp.asarray(inputs["text_mask"])
    rope = rotary_tables(grid, d, cfg.rope_max_seq_len)
    embedder = params["plucker_embedder"]["proj"]
    plucker = LinearPatches(jnp.asarray(inputs["chunk_plucker"], dtype), embedder["kernel"], embedder["bias"])
    transforms = jax.jit(lambda conditions: ucpe.ray_transforms(
        conditions, grid, cfg.patch_size, d, cfg.rope_max_seq_len))(jnp.asarray(inputs["camera_conditions"]))
    heads_shape = (b, t * s, heads, d)
    qkv = lambda: [normal(*heads_shape) for _ in range(3)]
    beta = jax.nn.sigmoid(normal(b, t, s, heads).astype(jnp.float32))
    decay = jax.nn.sigmoid(normal(b, t, heads).astype(jnp.float32))
    gdn_streams = [jnp.abs(normal(b, t, s, heads, d)).astype(jnp.float32) for _ in range(6)]

    def embedding(p, latents, timesteps, text_in, conditions):
        tokens = apply(PatchEmbed(cfg.patch_size, c, dtype, param_dtype))(p["x_embedder"], latents)
        t_embedding = apply(TimestepEmbedder(c, dtype, param_dtype))(p["t_embedder"], timesteps)
        modulation = apply(dense(6 * c, "t_block", dtype, param_dtype))(p["t_block"], nn.silu(t_embedding))
        y = apply(CaptionEmbedder(c, dtype, param_dtype))(p["y_embedder"], text_in)
        y = apply(RMSNorm(1e-5, dtype, param_dtype))(p["attention_y_norm"], y)
        ray = ucpe.ray_transforms(conditions, grid, cfg.patch_size, d, cfg.rope_max_seq_len)
        return tokens, modulation, y, ray, rotary_tables(grid, d, cfg.rope_max_seq_len)

    def projections(p, a, names):
        return [apply(nn.Dense(p[n]["kernel"].shape[-1], "bias" in p[n], dtype, param_dtype))(p[n], a)
                for n in names]

    def attention(kind):
        return DualBranchAttention(kind, heads, grid, cfg.conv_kernel_size, cfg.qk_norm, cfg.attention_impl,
                                   cfg.gdn_impl, dtype, param_dtype)

    def block_call(index):
        return jit(apply(SanaWMBlock(cfg, index, grid)), params[f"blocks_{index}"], x, text, text_mask,
                   normal(b, t, 6 * c), rope, transforms, plucker, None)

    table = {}
    table[EMBEDDING] = (jit(embedding, params, inputs["latents"], inputs["timesteps"], inputs["text"],
                            inputs["camera_conditions"]), 1)

    attn = params[f"blocks_{gdn_index}"]["attn"]
    names = GDN_PROJECTIONS + ("beta_proj", "gate_proj")
    table["GDN: projections (qkv, camera q/k/v/out, gates, output gate, proj)"] = (jit(
        lambda p, a: projections(p, a, names), attn, x), num_gdn)
    short_conv = apply(TemporalShortConv(cfg.conv_kernel_size, param_dtype))
    table["GDN: short conv on K (main + camera)"] = (jit(
        lambda p, a: [short_conv(p[n], a) for n in ("conv_k", "conv_k_cam")], attn, x), num_gdn)
    norm = apply(RMSNorm(1e-5, dtype, param_dtype))
    table["GDN: q/k RMSNorm + RoPE (main)"] = (jit(
        lambda p, q, k, tables: [apply_rope(norm(p[n], a).reshape(heads_shape), tables)
                                 for n, a in (("q_norm", q), ("k_norm", k))], attn, x, x, rope), num_gdn)
    table["GDN: recurrence (main num+den, camera num)"] = (jit(
        lambda q, k, v, qu, ku, vu, beta, decay: [frame_gdn(q, k, v, beta, decay, q, k),
                                                  frame_gdn(qu, ku, vu, beta, decay)],
        *gdn_streams, beta, decay), num_gdn)
    table["GDN: UCPE encode + decode (camera)"] = (jit(
        lambda q, k, v, ray: [ucpe.encode(q, k, v, ray), ucpe.decode(v, ray)], *qkv(), transforms), num_gdn)
    table["GDN: whole attention"] = (jit(apply(attention("gdn")), attn, x, rope, transforms), num_gdn)
    table["GDN: whole block"] = (block_call(gdn_index), num_gdn)

    if softmax_index is not None:
        attn = params[f"blocks_{softmax_index}"]["attn"]
        module = attention("softmax")
        table["softmax: projections (qkv, camera q/k/v/out, output gate, proj)"] = (jit(
            lambda p, a: projections(p, a, GDN_PROJECTIONS), attn, x), num_softmax)
        table["softmax: main attention (RoPE, softmax)"] = (jit(
            apply(module, "main_softmax"), attn, *qkv(), rope, None), num_softmax)
        table["softmax: camera attention (UCPE, softmax)"] = (jit(
            apply(module, "camera_softmax"), attn, *qkv(), transforms, None), num_softmax)
        table["softmax: whole attention"] = (jit(apply(module), attn, x, rope, transforms), num_softmax)
        table["softmax: whole block"] = (block_call(softmax_index), num_softmax)

    block = params[f"blocks_{gdn_index}"]
    cross = CrossAttention(cfg.num_attention_heads, cfg.cross_norm, cfg.attention_impl, dtype, param_dtype)
    table["cross-attention"] = (jit(apply(cross), block["cross_attn"], x, text, text_mask), cfg.num_layers)
    mlp = GLUMBConvTemp(c, cfg.mlp_hidden_size, (h, w), cfg.t_kernel_size, dtype, param_dtype)
    mlp_part = lambda part, a: jit(apply(mlp, lambda m, y: getattr(m, part)(y)), block["mlp"], a)
    doubled = 2 * cfg.mlp_hidden_size
    table["FFN: inverted conv (1x1)"] = (mlp_part("inverted_conv", normal(b * t, h, w, c)), cfg.num_layers)
    table["FFN: depthwise conv (3x3)"] = (mlp_part("depth_conv", normal(b * t, h, w, 2, doubled // 2)), cfg.num_layers)
    table["FFN: point conv (1x1)"] = (mlp_part("point_conv", normal(b * t, h, w, doubled // 2)), cfg.num_layers)
    table["FFN: temporal conv (3 frames)"] = (mlp_part("t_conv", x), cfg.num_layers)
    table["FFN: whole"] = (jit(apply(mlp), block["mlp"], x), cfg.num_layers)
    table["Plücker projection (with the embedding)"] = (jit(
        apply(PatchProjection(c, cfg.patch_size, dtype, param_dtype)), block["plucker_proj"], plucker, c), num_plucker)
    table[FINAL] = (jit(apply(FinalLayer(cfg)), params["final_layer"], x, normal(b, t, c)), 1)
    table[FORWARD] = (jit(apply(SanaWMTransformer(cfg)), params, **inputs), 1)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    before = machine_state()
    config = SanaWMConfig(**model_config_fields(args))
    params = init_params(config, jax.random.key(0))
    inputs = random_inputs(np.random.default_rng(0), args, config)
    table = parts(config, params, inputs)
    functions = {name: (lambda fn=fn: jax.block_until_ready(fn())) for name, (fn, _) in table.items()}
    timing = interleaved(functions, args.repeats)

    total = timing.median(FORWARD)
    print(f"config: {args.layers} layers, hidden {args.hidden}, head dim {args.head_dim}, latent "
          f"{args.frames}x{args.height}x{args.width}, text {args.text_len}; jax {jax.__version__} "
          f"({jax.default_backend()}), median of {args.repeats} interleaved repeats")
    print("\n| part | ms per call | calls per forward | ms per forward | % of forward |")
    print("|---|---|---|---|---|")
    for name, (_, count) in table.items():
        seconds = timing.median(name)
        print(f"| {name} | {1e3 * seconds:.2f} | {count} | {1e3 * seconds * count:.1f} | "
              f"{100 * seconds * count / total:.0f} |")
    blocks = sum(timing.median(name) * count for name, (_, count) in table.items()
                 if name.endswith("whole block") or name in (EMBEDDING, FINAL))
    print(f"\nembedding + whole blocks + final layer = {1e3 * blocks:.1f} ms vs whole forward {1e3 * total:.1f} ms")
    report_machine(before)


if __name__ == "__main__":
    main()
