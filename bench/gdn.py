"""The frame-level bidirectional GDN recurrence: CPU timings of the XLA op and the oracle, and the Pallas kernels'
cost at the released 720p / 60 s shapes with the H100 roofline it implies.

1. Wall time (median of --repeats, the two sides interleaved, after a first call reported apart) of our jitted XLA op `sanawm_jax.ops.gdn.frame_gdn`
   (main branch: numerator and denominator streams, float32) against diffusers' bidirectional composition — the
   oracle's `torch_chunk_sana_gdn` run forward (inclusive) and on flip_and_shift-ed inputs (exclusive backward), as
   `SanaWMBidirectionalGDNAttention` does — on the same inputs and CPU, plus the parity of the two outputs.
2. FLOPs and HBM bytes per call of the Pallas kernels (`pallas_kernels.frame_gdn.frame_gdn_costs`, the numbers
   the kernels hand to XLA as cost estimates) for H = 20, T = 121, S = 880, D = 112, and the time they imply on an
   H100 SXM: max(FLOPs / peak, bytes / HBM bandwidth).

Timings are single-threaded in both frameworks by default (`--threads 1`): on a shared 2-core machine torch's
2-thread pool stalls whenever another process holds a core, which makes 2-thread numbers swing by 10×.

    python bench/gdn.py [--shapes 1x2x9x220x112 ...] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.models.transformers.transformer_sana_wm import (
    flip_and_shift,
    torch_chunk_sana_gdn,
)
from timing import interleaved, machine_state, report_machine

from pallas_kernels.frame_gdn import frame_gdn_costs
from sanawm_jax.ops.gdn import frame_gdn

EPS = 1e-8
ORACLE_CHUNK = 21  # SanaWMBidirectionalGDNAttention's default temporal chunk
RELEASED = dict(frames=121, tokens=880, heads=20, dim=112)  # 720p latents (22×40), 961 pixel frames = 60 s at 16 fps
H100 = {  # H100 SXM peaks (dense) assumed for the roofline
    "fp32 non-tensor FLOP/s": 67e12,
    "bf16 tensor FLOP/s": 989e12,
    "HBM bytes/s": 3.35e12,
}




def random_inputs(rng, batch, heads, frames, tokens, dim):
    """frame_gdn's layout: q_rot, k_rot, v, q, k (B, T, S, H, D); beta (B, T, S, H); decay (B, T, H)."""
    shape = (batch, frames, tokens, heads, dim)
    features = lambda scale: np.maximum(rng.standard_normal(shape), 0.0) * scale
    key_scale = dim**-0.5 * tokens**-0.5
    return {
        "q_rot": features(1.0), "k_rot": features(key_scale), "v": rng.standard_normal(shape),
        "beta": 1.0 / (1.0 + np.exp(-rng.standard_normal(shape[:-1]))),
        "decay": rng.uniform(0.5, 1.0, (batch, frames, heads)),
        "q": features(1.0), "k": features(key_scale),
    }


def oracle_bidirectional(q, k, v, q_rot, k_rot, beta, decay):
    """The oracle's composition on its layout: q, k, v, q_rot, k_rot (B, H, D, T·S); beta (B, H, T, S); decay (B, H, T).
    Returns (B, H, D, T·S)."""
    b, h, _, n = q.shape
    t = beta.shape[2]

    def frames(x):  # (B, H, E, T·S) -> (B, H, T, E, S)
        return x.view(b, h, x.shape[2], t, n // t).permute(0, 1, 3, 2, 4)

    def flat(x):  # (B, H, T, E, S) -> (B, H, E, T·S)
        return x.permute(0, 1, 3, 2, 4).reshape(b, h, x.shape[3], n)

    flipped = lambda x: flat(frames(x).flip(2))
    shifted = lambda x: flat(flip_and_shift(frames(x), dim=2))
    num_fwd, den_fwd = torch_chunk_sana_gdn(
        q, k, v, q_rot, k_rot, beta, decay, chunk_size=ORACLE_CHUNK, return_components=True)
    num_bwd, den_bwd = torch_chunk_sana_gdn(
        flipped(q), shifted(k), shifted(v), flipped(q_rot), shifted(k_rot), flip_and_shift(beta, dim=2),
        flip_and_shift(decay, dim=2, shift_val=1.0), chunk_size=ORACLE_CHUNK, return_components=True)
    return (num_fwd + flipped(num_bwd)) / (den_fwd + flipped(den_bwd) + EPS)


def time_cpu(shape, repeats):
    batch, heads, frames, tokens, dim = shape
    inputs = random_inputs(np.random.default_rng(0), batch, heads, frames, tokens, dim)
    names = ("q_rot", "k_rot", "v", "beta", "decay", "q", "k")
    jax_args = [jnp.asarray(inputs[name], jnp.float32) for name in names]
    xla_op = jax.jit(lambda *a: frame_gdn(*a, eps=EPS))

    def oracle_layout(x):  # (B, T, S, H, D) -> (B, H, D, T·S); beta (B, T, S, H) -> (B, H, T, S); decay -> (B, H, T)
        x = torch.from_numpy(np.asarray(x, np.float32))
        if x.ndim == 5:
            return x.permute(0, 3, 4, 1, 2).reshape(batch, heads, dim, frames * tokens).contiguous()
        return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.permute(0, 2, 1).contiguous()

    torch_args = {name: oracle_layout(inputs[name]) for name in names}

    def run_oracle():
        with torch.no_grad():
            return oracle_bidirectional(*(torch_args[n] for n in ("q", "k", "v", "q_rot", "k_rot", "beta", "decay")))

    timing = interleaved({"xla": lambda: xla_op(*jax_args).block_until_ready(), "oracle": run_oracle}, repeats)
    ours = np.asarray(xla_op(*jax_args), np.float64).transpose(0, 3, 4, 1, 2).reshape(batch, heads, dim, -1)
    reference = run_oracle().double().numpy()
    parity = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    return timing, parity


def kernel_costs_table():
    rows = []
    for batch in (1, 2):
        for branch, with_denominator in (("main", True), ("camera", False)):
            costs = frame_gdn_costs(batch, RELEASED["frames"], RELEASED["tokens"], RELEASED["heads"], RELEASED["dim"],
                                    dtype=jnp.bfloat16, with_denominator=with_denominator)
            for direction, cost in zip(("forward", "backward"), costs):
                fp32 = cost.flops / H100["fp32 non-tensor FLOP/s"]
                bf16 = cost.flops / H100["bf16 tensor FLOP/s"]
                hbm = cost.bytes_accessed / H100["HBM bytes/s"]
                rows.append(
                    f"| {batch} | {branch} | {direction} | {cost.flops / 1e12:.3f} | {cost.bytes_accessed / 1e9:.2f} "
                    f"| {fp32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {hbm * 1e3:.2f} | {max(fp32, hbm) * 1e3:.2f} |"
                )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+",
                        default=["1x2x9x220x112", "1x2x21x220x112", "1x2x61x220x112", "1x2x21x880x112"],
                        help="BxHxTxSxD shapes for the CPU timings")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, choices=(1, 2), default=1,
                        help="1: torch and XLA single-threaded; 2: torch 2 threads, XLA's default thread pool")
    args = parser.parse_args()
    before = machine_state()
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # read when the XLA CPU backend starts, i.e. at the first computation below
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, threads {args.threads}, "
          f"oracle chunk {ORACLE_CHUNK}")
    print("\n| B×H×T×S×D | XLA compile s | XLA op (jit) | oracle (torch) | oracle / XLA | spread | parity (rel. L2) |")
    print("|---|---|---|---|---|---|---|")
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split("x"))
        timing, parity = time_cpu(shape, args.repeats)
        ratio, spread = timing.ratio("oracle", "xla")
        print(f"| {text} | {timing.first['xla']:.1f} | {timing.median('xla') * 1e3:.1f} ms "
              f"| {timing.median('oracle') * 1e3:.1f} ms | {ratio:.2f}× | {spread:.2f} | {parity:.1e} |")
    report_machine(before)

    peaks = ", ".join(f"{name} {value:.3g}" for name, value in H100.items())
    print(f"\nPallas kernels per call at H={RELEASED['heads']}, T={RELEASED['frames']}, S={RELEASED['tokens']}, "
          f"D={RELEASED['dim']} (bf16 inputs; padded to S=896, D=128; chunk 16). H100 SXM: {peaks}")
    print("| B | branch | kernel | TFLOP | HBM GB | fp32 compute ms | bf16 compute ms | HBM ms "
          "| roofline ms (fp32 dots) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in kernel_costs_table():
        print(row)


if __name__ == "__main__":
    main()
