"""Softmax attention with a selectable implementation.

"xla": heads-major einsum logits with float32 accumulation, float32 softmax statistics; the unnormalised weights
exp(logit - max), cast to the value dtype, go through the second matmul (float32 accumulation) and the result is
divided by their float32 row sums, which saves a pass over the logits. Queries are processed in at most
`query_block`-row blocks of equal size (a `lax.map`), so the logits held at once are (B, H, <= query_block, Nk)
rather than (B, H, Nq, Nk): exact, since every query row's softmax is independent.
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

    key_heads, value_heads = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # (B, H, Nk, D)

    def attend(query_rows):
        logits = jnp.einsum("bhqd,bhkd->bhqk", jnp.swapaxes(query_rows, 1, 2), key_heads,
                            preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            logits = jnp.where(key_mask, logits, MASKED_LOGIT)
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), value_heads,
                         preferred_element_type=jnp.float32)
        out = out / jnp.sum(weights, axis=-1, keepdims=True)
        return jnp.swapaxes(out, 1, 2).astype(value.dtype)

    b, nq, h, d = query.shape
    if nq <= query_block:
        return attend(query)
    num_blocks = -(-nq // query_block)
    block = -(-nq // num_blocks)
    padded = jnp.pad(query, ((0, 0), (0, num_blocks * block - nq), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(b, num_blocks, block, h, d), 1, 0)
    out = jax.lax.map(attend, blocks)
    return jnp.moveaxis(out, 0, 1).reshape(b, num_blocks * block, h, value.shape[-1])[:, :nq]
