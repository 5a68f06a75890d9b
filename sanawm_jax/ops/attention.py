"""Softmax attention with a selectable implementation.

"xla": einsum logits with float32 accumulation, float32 softmax, probabilities cast to the value dtype for the second
matmul. Queries are processed in blocks of `query_block` (a `lax.map`), so the logits held at once are
(B, H, query_block, Nk) rather than (B, H, Nq, Nk): exact, since every query row's softmax is independent.
"cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash-attention kernel on NVIDIA GPUs
(bf16/fp16 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_LOGIT = -1e9
QUERY_BLOCK = 512  # released shapes (B=2, H=20, 106,480 keys): 8.7 GB of float32 logits per block


def dot_product_attention(query, key, value, *, scale: float, key_mask=None, impl: str = "xla",
                          query_block: int = QUERY_BLOCK):
    """query (B, Nq, H, D), key/value (B, Nk, H, D), key_mask (B or 1, 1, 1, Nk) bool or None.

    Returns (B, Nq, H, D) in value.dtype.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, mask=key_mask, implementation="cudnn"
        ).astype(value.dtype)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}")

    def attend(query_rows):
        logits = jnp.einsum("bqhd,bkhd->bhqk", query_rows, key, preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            logits = jnp.where(key_mask, logits, MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)

    b, nq, h, d = query.shape
    if nq <= query_block:
        return attend(query)
    num_blocks = -(-nq // query_block)
    padded = jnp.pad(query, ((0, 0), (0, num_blocks * query_block - nq), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(b, num_blocks, query_block, h, d), 1, 0)
    out = jax.lax.map(attend, blocks)
    return jnp.moveaxis(out, 0, 1).reshape(b, num_blocks * query_block, h, value.shape[-1])[:, :nq]
