"""The XLA softmax attention gives the same result whether queries run in one block or in several."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sanawm_jax.ops.attention import dot_product_attention


@pytest.mark.parametrize("query_block", [4, 7, 64])
def test_query_blocks_equal_one_block(query_block):
    rng = np.random.default_rng(0)
    query, key, value = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (30, 30, 30))
    key_mask = rng.random((2, 1, 1, 30)) > 0.3
    expected = dot_product_attention(query, key, value, scale=0.3, key_mask=key_mask, query_block=30)
    blocked = jax.jit(lambda q: dot_product_attention(q, key, value, scale=0.3, key_mask=key_mask,
                                                      query_block=query_block))(query)
    # Same float32 ops per query row; only the batching of rows differs.
    np.testing.assert_allclose(blocked, expected, rtol=1e-6, atol=1e-6)


def test_masked_keys_get_no_weight():
    rng = np.random.default_rng(1)
    query, key, value = (rng.standard_normal((1, 5, 2, 4)).astype(np.float32) for _ in range(3))
    key_mask = np.array([True, True, False, False, True])[None, None, None]
    out = dot_product_attention(query, key, value, scale=0.5, key_mask=key_mask)
    changed = value.copy()
    changed[:, 2:4] += 100.0
    np.testing.assert_allclose(dot_product_attention(query, key, changed, scale=0.5, key_mask=key_mask), out,
                               rtol=1e-6)
