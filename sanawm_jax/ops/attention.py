"""Softmax attention with a selectable implementation.

"xla": einsum logits with float32 accumulation, float32 softmax, probabilities cast to the value dtype for the second
matmul. "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash-attention kernel on NVIDIA
GPUs (bf16/fp16 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_LOGIT = -1e9


def dot_product_attention(query, key, value, *, scale: float, key_mask=None, impl: str = "xla"):
    """query (B, Nq, H, D), key/value (B, Nk, H, D), key_mask broadcastable to (B, H, Nq, Nk) bool or None.

    Returns (B, Nq, H, D) in value.dtype.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, mask=key_mask, implementation="cudnn"
        ).astype(value.dtype)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
