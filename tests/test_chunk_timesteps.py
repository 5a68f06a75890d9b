"""Upstream's stage-1 chunk-timestep mixture: chunk layout, each mode's contract, the mixture frequencies and the exact
law of the monotone modes, the mapping of integer steps to σ, and the config / CLI switch.

Expected values are derived here from upstream's documented recipe (UPSTREAM_NOTES.md §1.6 and §5.2, upstream's
tests/test_sana_wm_timesteps.py), not from our sampler. Frequencies are compared with 5 binomial standard errors
(a false alarm has probability < 1e-6 per compared frequency; the seeds are fixed, so the tests are deterministic).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from sanawm_jax.training import TrainConfig, objective

SAME_T, INCREMENTAL, LAST_ANCHOR, TEACHER_FORCING = range(4)
NUM_SAMPLES = 8000


def rng(seed: int) -> jax.Array:
    """A random key of XLA's RngBitGenerator: its programs compile several times faster than threefry's on CPU."""
    return jax.random.key(seed, impl="rbg")


def tolerance(probability: float, count: int) -> float:
    """5 standard errors of a frequency estimated from `count` Bernoulli(probability) draws."""
    return 5 * math.sqrt(probability * (1 - probability) / count)


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def integer_logit_normal_law(num_steps: int) -> np.ndarray:
    """P(⌊num_steps·sigmoid(n)⌋ = q), n ~ N(0, 1), for q in [0, num_steps)."""
    def cdf(u):  # P(sigmoid(n) < u)
        return 0.0 if u <= 0 else 1.0 if u >= 1 else normal_cdf(math.log(u / (1 - u)))
    return np.array([cdf((q + 1) / num_steps) - cdf(q / num_steps) for q in range(num_steps)])


def chunk_sizes(num_valid, num_frames: int, chunk_size: int = 3) -> list[list[int]]:
    index, num_chunks = objective.frame_chunk_index(jnp.asarray(num_valid), num_frames, chunk_size)
    index, num_chunks = np.asarray(index), np.asarray(num_chunks)
    return [np.bincount(row[:valid], minlength=count).tolist() for row, valid, count in zip(index, num_valid, num_chunks)]


@pytest.fixture(scope="module")
def upstream_mixture():
    """Steps and modes of NUM_SAMPLES draws of the upstream mixture over 6 chunks (T = 21 latent frames)."""
    sample = jax.jit(lambda key: objective.chunk_mixture_steps(
        key, jnp.full((NUM_SAMPLES,), 6), 6, objective.UPSTREAM_CHUNK_MIXTURE
    ))
    steps, mode = sample(rng(0))
    return np.asarray(steps), np.asarray(mode)


# ---- layout ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames, starts", [
    (1, [0]),
    (4, [0]),
    (7, [0, 4]),
    (21, [0, 4, 7, 10, 13, 16]),  # the last chunk holds 5: a remainder of 2 < 3 joins it
    (41, [0, *range(4, 38, 3)]),  # sizes [4, 3 × 11, 4] (UPSTREAM_NOTES §1.6)
    (121, [0, *range(4, 119, 3)]),  # one chunk of 4 and 39 of 3
])
def test_chunk_layout_matches_the_documented_starts(num_frames, starts):
    index, num_chunks = objective.frame_chunk_index(jnp.array([num_frames]), num_frames, 3)
    index = np.asarray(index)[0]
    assert [0, *np.flatnonzero(np.diff(index)) + 1] == starts
    assert int(num_chunks[0]) == objective.max_chunks(num_frames, 3) == len(starts)


def test_layout_follows_the_valid_frames_of_padded_clips():
    """Trailing padding does not change a clip's chunks: 7 valid frames of 9 chunk as [4, 3], 9 as [4, 5]; padded
    frames join the last chunk."""
    index, _ = objective.frame_chunk_index(jnp.array([7, 9]), 9, 3)
    assert chunk_sizes([7, 9], 9) == [[4, 3], [4, 5]]
    assert np.asarray(index)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]


# ---- mixture ------------------------------------------------------------------------------------------------------


def test_mode_frequencies_match_the_upstream_weights(upstream_mixture):
    _, mode = upstream_mixture
    frequencies = np.bincount(mode, minlength=4) / NUM_SAMPLES
    for frequency, probability in zip(frequencies, objective.UPSTREAM_CHUNK_MIXTURE):
        assert abs(frequency - probability) <= tolerance(probability, NUM_SAMPLES)


def test_steps_are_integers_in_range(upstream_mixture):
    steps, _ = upstream_mixture
    assert steps.dtype == np.int32 and steps.min() >= 0 and steps.max() < 1000


def test_same_t_gives_every_chunk_one_step(upstream_mixture):
    steps, mode = upstream_mixture
    same = steps[mode == SAME_T]
    assert len(same) > 0 and np.all(same == same[:, :1])


def test_anchored_modes_are_non_decreasing_across_chunks(upstream_mixture):
    steps, mode = upstream_mixture
    anchored = steps[(mode == INCREMENTAL) | (mode == LAST_ANCHOR)]
    assert np.all(np.diff(anchored, axis=1) >= 0)
    assert np.mean(np.any(np.diff(anchored, axis=1) > 0, axis=1)) > 0.9  # not collapsed onto same_t


def test_last_chunk_anchor_holds_the_logit_normal_base_step(upstream_mixture):
    """The last chunk of last_chunk_anchor and teacher_forcing_clean samples is the integer logit-normal draw:
    Kolmogorov distance to its law within 1.63/sqrt(n) (the 1 % critical value)."""
    steps, mode = upstream_mixture
    last = steps[(mode == LAST_ANCHOR) | (mode == TEACHER_FORCING), -1]
    law_cdf = np.cumsum(integer_logit_normal_law(1000))
    empirical_cdf = np.searchsorted(np.sort(last), np.arange(1000), side="right") / len(last)
    assert np.max(np.abs(empirical_cdf - law_cdf)) <= 1.63 / math.sqrt(len(last))


def test_teacher_forcing_zeroes_a_prefix_of_chunks_never_the_last(upstream_mixture):
    """Chunk 0 always has step 0 (upstream's contract); the zeroed prefix has 1 … K − 1 chunks, each length about
    equally often, and the chunks after it continue the monotone schedule."""
    steps, mode = upstream_mixture
    forced = steps[mode == TEACHER_FORCING]
    assert np.all(forced[:, 0] == 0) and np.all(forced[:, -1] > 0)
    assert np.all(np.diff(forced, axis=1) >= 0)
    prefix = np.argmax(forced > 0, axis=1)
    assert prefix.min() >= 1 and prefix.max() <= 5
    frequencies = np.bincount(prefix, minlength=6)[1:] / len(forced)
    # A monotone step after the prefix is itself 0 with probability about 1/(base + 1): a small excess of longer
    # prefixes, well inside the tolerance.
    assert np.all(np.abs(frequencies - 0.2) <= tolerance(0.2, len(forced)) + 0.01)


def test_incremental_sequences_follow_upstreams_dynamic_programming_law():
    """With 4 training steps and 3 chunks, incremental mode equals upstream's `IncrementalTimesteps` law: a uniform
    anchor chunk c holds the base step b, the sequence is uniform among the non-decreasing sequences through
    (c, b): P(s) = Σ_c (1/3)·P(b = s_c) / #{non-decreasing s' with s'_c = s_c}."""
    num_steps, num_chunks, count = 4, 3, 20000
    sample = jax.jit(lambda key: objective.chunk_mixture_steps(
        key, jnp.full((count,), num_chunks), num_chunks, (0.0, 1.0, 0.0, 0.0), num_steps=num_steps
    )[0])
    drawn = np.asarray(sample(rng(1)))
    base = integer_logit_normal_law(num_steps)
    sequences = [s for s in itertools.product(range(num_steps), repeat=num_chunks) if list(s) == sorted(s)]
    through = {(c, v): sum(s[c] == v for s in sequences) for c in range(num_chunks) for v in range(num_steps)}
    for sequence in sequences:
        expected = sum(base[sequence[c]] / through[c, sequence[c]] for c in range(num_chunks)) / num_chunks
        frequency = np.mean(np.all(drawn == np.array(sequence), axis=1))
        assert abs(frequency - expected) <= tolerance(expected, count), (sequence, frequency, expected)


def test_uniform_monotone_steps_is_uniform_over_sequences():
    """Two values in [1, 4] (and rows of other lengths in the same batch): each of the C(5, 2) = 10 non-decreasing
    pairs equally often; a row of length 0 and one confined to a single value are unaffected by the others."""
    count = 20000
    length = jnp.tile(jnp.array([2, 0, 3]), count)
    low, high = jnp.tile(jnp.array([1, 0, 2]), count), jnp.tile(jnp.array([4, 5, 2]), count)
    drawn = np.asarray(jax.jit(objective.uniform_monotone_steps, static_argnums=(4, 5))(
        rng(2), length, low, high, 3, 8))
    pairs = drawn[0::3, :2]
    assert np.all(drawn[2::3] == 2)
    for pair in itertools.combinations_with_replacement(range(1, 5), 2):
        frequency = np.mean(np.all(pairs == np.array(pair), axis=1))
        assert abs(frequency - 0.1) <= tolerance(0.1, count), pair


# ---- frames, σ and the training inputs -----------------------------------------------------------------------------


def test_frame_steps_are_constant_within_chunks_and_short_clips_draw_per_frame():
    sample = jax.jit(lambda key, valid: objective.chunk_mixture_frame_steps(
        key, valid, 21, probs=objective.UPSTREAM_CHUNK_MIXTURE, chunk_size=3
    ))
    steps = np.asarray(sample(rng(3), jnp.full((64,), 21)))
    assert steps.shape == (64, 21)
    for first, last in zip([0, 4, 7, 10, 13, 16], [4, 7, 10, 13, 16, 21]):
        assert np.all(steps[:, first:last] == steps[:, first:first + 1])
    # Three valid frames are no chunk: independent steps per frame (equal for all three by chance with p < 0.01).
    short = np.asarray(sample(rng(4), jnp.full((64,), 3)))[:, :3]
    assert np.mean(np.all(short == short[:, :1], axis=1)) < 0.1


def test_integer_steps_map_to_shifted_sigmas_and_the_clean_first_frame():
    """σ = s·(t/1000) / (1 + (s − 1)·t/1000); frame 0 of a clean-first sample has σ = 0 and no loss weight."""
    shift = 9.95
    steps = jnp.array([0, 1, 500, 999])
    expected = [shift * t / 1000 / (1 + (shift - 1) * t / 1000) for t in (0, 1, 500, 999)]
    np.testing.assert_allclose(objective.sigmas_from_steps(steps, shift), expected, rtol=1e-6)
    latents = jnp.ones((4, 7, 2, 2, 3))
    inputs = jax.jit(lambda key: objective.training_inputs(
        key, latents, shift=shift, clean_first_frame_prob=1.0, timestep_sampling="chunk_mixture"
    ))(rng(5))
    timesteps = np.asarray(inputs["timesteps"])
    assert timesteps.shape == (4, 7) and np.all(timesteps[:, 0] == 0)
    assert np.all(np.asarray(inputs["frame_weights"])[:, 0] == 0)
    grid = 1000 * shift * np.arange(1000) / 1000 / (1 + (shift - 1) * np.arange(1000) / 1000)
    assert np.all(np.min(np.abs(timesteps[..., None] - grid), axis=-1) <= 1e-3)  # on upstream's integer grid
    assert np.all(timesteps[:, 4:] == timesteps[:, 4:5])  # frames 4-6 are one chunk


def test_config_and_cli_select_the_sampling():
    assert TrainConfig().timestep_sampling == "logit_normal"
    config = TrainConfig(timestep_sampling="chunk_mixture", chunk_mixture_probs=[1, 1, 0, 0])
    assert config.chunk_mixture_probs == (1.0, 1.0, 0.0, 0.0) and config.timestep_chunk_size == 3
    with pytest.raises(ValueError, match="timestep_sampling"):
        TrainConfig(timestep_sampling="uniform")
    with pytest.raises(ValueError, match="chunk_mixture_probs"):
        TrainConfig(chunk_mixture_probs=(0.5, 0.5, 0.0))
    assert train.parse_args(["--workdir", "w", "--timestep-sampling", "chunk_mixture"]).timestep_sampling == "chunk_mixture"
