"""RMS normalisation shared by every model's norm layers; statistics always in float32."""

import jax
import jax.numpy as jnp


def rms_normalize(x, eps: float):
    """x / sqrt(mean(x², last axis) + eps), computed and returned in float32; (..., C) -> (..., C)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
