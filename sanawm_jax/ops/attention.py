"""Softmax attention with a selectable implementation.

"xla": heads-major einsum logits with float32 accumulation, float32 softmax statistics; the unnormalised weights
exp(logit - max), cast to the value dtype, go through the second matmul (float32 accumulation) and the result is
divided by their float32 row sums, which saves a pass over the logits. Queries are processed in blocks of equal
size (a `lax.map`, see `query_blocking`), so the logits held at once are (B, H, rows, Nk) rather than (B, H, Nq, Nk):
exact, since every query row's softmax is independent. Gradients recompute each block's logits (`jax.checkpoint`).
"cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash-attention kernel on NVIDIA GPUs
(bf16/fp16 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_LOGIT = -1e9
LOGITS_BLOCK_BYTES = 8 * 2**20  # float32 logits per block (see `query_blocking`)
MIN_QUERY_BLOCK = 64  # fewest rows per block (more keys than the byte budget allows): bounds the loop's trip count


def query_blocking(batch: int, heads: int, queries: int, keys: int, query_block: int | None = None) -> tuple[int, int]:
    """(number of blocks, rows per block) for `queries` rows: equal blocks whose (batch, heads, rows, keys) float32
    logits fit LOGITS_BLOCK_BYTES (but at least MIN_QUERY_BLOCK rows), of at most `query_block` rows if given.

    Why a byte budget: on the CPU, glibc hands out every allocation above 32 MiB as fresh mmap'd pages, so a larger
    logits buffer is page-faulted and zeroed by the kernel on every call (at 4400 keys and 4 heads, 9 blocks of 489
    rows, 34 MiB, cost 1.43x the CPU time of 19 blocks of 232, 16 MiB), and blocks of about 8 MiB ran 1.08x faster
    than 16 MiB ones at 1980 keys and 4 heads or 1100 keys and 8 heads. On a GPU a block this size still fills the
    device (the released shapes, B=2, H=20, 106,480 keys, get 64-row blocks of 1.1 GB instead of 512-row blocks of
    8.7 GB). Attention to few keys (cross-attention to text) runs as one block: at 1100 queries, 64 keys and 4 heads
    the three 367-row blocks of a former 512-row limit took 1.26x its CPU time."""
    budget_rows = LOGITS_BLOCK_BYTES // (4 * batch * heads * keys)
    rows = min(max(MIN_QUERY_BLOCK, budget_rows), queries, query_block or queries)
    num_blocks = -(-queries // rows)
    return num_blocks, -(-queries // num_blocks)


def dot_product_attention(query, key, value, *, scale: float, key_mask=None, impl: str = "xla",
                          query_block: int | None = None, segments=None):
    """query (B, Nq, H, D), key/value (B, Nk, H, D), key_mask (B or 1, 1, 1, Nk) bool or None.
    query_block: most query rows per block of the "xla" path, None: as the logits budget allows (`query_blocking`).

    segments: optional (query_segments (Nq,), key_segments (Nk,)) int arrays for block-causal attention: a query
    attends a key only if key_segment <= query_segment (chunk-causal mode). None: no such mask in the program.
    Returns (B, Nq, H, D) in value.dtype.
    """
    if impl == "cudnn":
        mask = key_mask
        if segments is not None:
            causal = (jnp.asarray(segments[1])[None, :] <= jnp.asarray(segments[0])[:, None])[None, None]
            mask = causal if key_mask is None else causal & key_mask
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, mask=mask, implementation="cudnn"
        ).astype(value.dtype)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}")

    key_heads, value_heads = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # (B, H, Nk, D)

    def attend(query_rows, query_segments=None):
        logits = jnp.einsum("bhqd,bhkd->bhqk", jnp.swapaxes(query_rows, 1, 2), key_heads,
                            preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            logits = jnp.where(key_mask, logits, MASKED_LOGIT)
        if query_segments is not None:
            logits = jnp.where(key_segments[None, :] <= query_segments[:, None], logits, MASKED_LOGIT)
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), value_heads,
                         preferred_element_type=jnp.float32)
        out = out / jnp.sum(weights, axis=-1, keepdims=True)
        return jnp.swapaxes(out, 1, 2).astype(value.dtype)

    key_segments = None if segments is None else jnp.asarray(segments[1])
    query_segments = None if segments is None else jnp.asarray(segments[0])
    b, nq, h, d = query.shape
    num_blocks, block = query_blocking(b, h, nq, key.shape[1], query_block)
    if num_blocks == 1:
        return attend(query, query_segments)
    # Under autodiff each block's logits and weights are recomputed in the backward pass instead of saved: saved,
    # they would stack into the whole (B, H, Nq, Nk) matrix the blocks exist to avoid (at 720p, T = 21 and 20 heads,
    # 27 GB per float32 copy). Without autodiff the checkpoint changes nothing.
    attend_block = jax.checkpoint(attend, prevent_cse=False)
    padded = jnp.pad(query, ((0, 0), (0, num_blocks * block - nq), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(b, num_blocks, block, h, d), 1, 0)
    if query_segments is None:
        out = jax.lax.map(attend_block, blocks)
    else:
        segment_blocks = jnp.pad(query_segments, (0, num_blocks * block - nq), mode="edge").reshape(num_blocks, block)
        out = jax.lax.map(lambda args: attend_block(*args), (blocks, segment_blocks))
    return jnp.moveaxis(out, 0, 1).reshape(b, num_blocks * block, h, value.shape[-1])[:, :nq]
