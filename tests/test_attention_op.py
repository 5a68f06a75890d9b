"""The XLA softmax attention gives the same result whether queries run in one block or in several."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sanawm_jax.ops import attention
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


def test_query_block_gradients_equal_one_block():
    """Blocks recompute their logits in the backward pass (`jax.checkpoint`); the gradients must not change."""
    rng = np.random.default_rng(1)
    query, key, value, cotangent = (rng.standard_normal((2, 30, 3, 8)).astype(np.float32) for _ in range(4))
    key_mask = rng.random((2, 1, 1, 30)) > 0.3
    segments = (np.arange(30) // 10, np.arange(30) // 10)

    def gradients(query_block):
        loss = lambda q, k, v: (dot_product_attention(q, k, v, scale=0.3, key_mask=key_mask, segments=segments,
                                                      query_block=query_block) * cotangent).sum()
        return jax.jit(jax.grad(loss, (0, 1, 2)))(query, key, value)

    for blocked, whole in zip(gradients(7), gradients(30)):
        np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)  # float32, rows batched differently


def test_masked_keys_get_no_weight():
    rng = np.random.default_rng(1)
    query, key, value = (rng.standard_normal((1, 5, 2, 4)).astype(np.float32) for _ in range(3))
    key_mask = np.array([True, True, False, False, True])[None, None, None]
    out = dot_product_attention(query, key, value, scale=0.5, key_mask=key_mask)
    changed = value.copy()
    changed[:, 2:4] += 100.0
    np.testing.assert_allclose(dot_product_attention(query, key, changed, scale=0.5, key_mask=key_mask), out,
                               rtol=1e-6)


@pytest.mark.parametrize("batch, heads, queries, keys", [(1, 4, 4400, 4400), (1, 4, 1980, 1980), (1, 8, 1100, 1100),
                                                         (2, 20, 106480, 106480), (2, 3, 30, 30)])
def test_query_blocks_cover_the_queries_within_the_logits_budget(batch, heads, queries, keys):
    num_blocks, rows = attention.query_blocking(batch, heads, queries, keys)
    assert num_blocks * rows >= queries > (num_blocks - 1) * rows
    assert num_blocks * rows - queries < num_blocks  # equal blocks: less than one padded row per block
    within_budget = 4 * batch * heads * rows * keys <= attention.LOGITS_BLOCK_BYTES
    assert within_budget or rows <= attention.MIN_QUERY_BLOCK


def test_blocks_chosen_by_the_logits_budget_equal_one_block(monkeypatch):
    rng = np.random.default_rng(2)
    query, key, value = (rng.standard_normal((1, n, 2, 8)).astype(np.float32) for n in (100, 40, 40))
    expected = dot_product_attention(query, key, value, scale=0.3)
    monkeypatch.setattr(attention, "LOGITS_BLOCK_BYTES", 4 * 2 * 10 * 40)  # 10 rows of logits per block
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 1)
    assert attention.query_blocking(1, 2, 100, 40) == (10, 10)
    blocked = jax.jit(lambda q: dot_product_attention(q, key, value, scale=0.3))(query)
    # Same float32 ops per query row; only the batching of rows differs.
    np.testing.assert_allclose(blocked, expected, rtol=1e-6, atol=1e-6)
