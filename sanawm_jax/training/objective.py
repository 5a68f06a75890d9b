"""Stage-1 flow-matching objective: per-frame noise levels, noising, velocity target and the masked loss.

Flow matching with x_σ = (1 − σ)·x0 + σ·ε and target v = ε − x0 (plain MSE, no timestep weighting); the model
receives 1000·σ. With probability `clean_first_frame_prob` a sample's frame 0 is the clean conditioning frame
(σ = 0) and is left out of the loss. Two ways to draw the noise levels (`TrainConfig.timestep_sampling`):

"logit_normal": every latent frame draws its own continuous σ (diffusion forcing): u = sigmoid(n),
n ~ N(mean, std), shifted by s to σ = s·u / (1 + (s − 1)·u). No chunk structure, no integer rounding.

"chunk_mixture" (upstream's stage-1 recipe): integer training steps t ∈ [0, 1000) drawn per chunk of latent frames and
mapped to σ = shift(t / 1000) (upstream's `linear_flow` grid σ_t = t/1000 read through its respacing map). Chunks:
the first holds chunk_size + 1 frames (the conditioning frame plus one chunk), then chunks of chunk_size; a
remainder smaller than chunk_size joins the last chunk (T = 41, chunk_size 3: sizes [4, 3 × 11, 4]). A clip of at
most chunk_size frames has no chunks: every frame draws its own integer step. Each sample picks one mode:
  same_t                 every chunk takes the base step b = ⌊1000·sigmoid(N(mean, std))⌋;
  incremental            a random anchor chunk takes b; the other chunks are a non-decreasing sequence across
                         chunks through it (earlier chunks no noisier), uniform over all such integer sequences;
  last_chunk_anchor      the same with the last chunk as anchor;
  teacher_forcing_clean  last_chunk_anchor, then a uniform random prefix of 1 … K − 1 chunks set to t = 0 (chunk 0
                         always clean, the last chunk never zeroed by it). Those clean chunks stay in the loss.
The uniform monotone sequences equal the law of upstream's dynamic-programming sampler (`IncrementalTimesteps`),
drawn here by stars and bars: a uniform non-decreasing sequence of n values in [lo, hi] is p_i − i + lo for a uniform
random n-subset p_0 < … < p_{n−1} of {0, …, n + hi − lo − 1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sanawm_jax.diffusion.scheduler import NUM_TRAIN_TIMESTEPS, shift_sigmas

TIMESTEP_SAMPLING = ("logit_normal", "chunk_mixture")
CHUNK_MODES = ("same_t", "incremental", "last_chunk_anchor", "teacher_forcing_clean")
UPSTREAM_CHUNK_MIXTURE = (0.1, 0.4, 0.4, 0.1)  # weights of CHUNK_MODES in upstream's stage-1 config
UPSTREAM_CHUNK_SIZE = 3  # latent frames per chunk (the first chunk has one more)


def sample_sigmas(key: jax.Array, shape: tuple[int, ...], shift: float, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Shifted logit-normal noise levels of the given shape (e.g. (B, T)), float32 in (0, 1)."""
    logits = mean + std * jax.random.normal(key, shape, jnp.float32)
    return shift_sigmas(jax.nn.sigmoid(logits), shift)


def sample_integer_steps(
    key: jax.Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> jax.Array:
    """Integer logit-normal training steps ⌊num_steps·sigmoid(N(mean, std))⌋ of the given shape, int32 in
    [0, num_steps)."""
    u = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    return jnp.clip(jnp.floor(u * num_steps).astype(jnp.int32), 0, num_steps - 1)


def sigmas_from_steps(steps: jax.Array, shift: float, num_steps: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """σ = shift(t / num_steps) of integer steps t, float32 (t = 0 is clean)."""
    return shift_sigmas(steps.astype(jnp.float32) / num_steps, shift)


def max_chunks(num_frames: int, chunk_size: int) -> int:
    """Number of chunks of a clip of num_frames latent frames (1 when it is too short to have chunks)."""
    return 1 + (num_frames - chunk_size - 1) // chunk_size if num_frames > chunk_size else 1


def frame_chunk_index(num_valid: jax.Array, num_frames: int, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Chunk of every frame for clips of num_valid (B,) leading valid frames out of num_frames.

    Returns (chunk index (B, T) int32, chunks per sample (B,) int32); frames past a clip's end belong to its last
    chunk. A clip of at most chunk_size frames has no chunks (every frame its own index; see the module docstring).
    """
    frames = jnp.arange(num_frames, dtype=jnp.int32)[None, :]
    num_valid = num_valid.astype(jnp.int32)[:, None]
    num_chunks = 1 + jnp.maximum(num_valid - chunk_size - 1, 0) // chunk_size
    chunked = jnp.minimum(jnp.maximum(frames - 1, 0) // chunk_size, num_chunks - 1)
    index = jnp.where(num_valid > chunk_size, chunked, jnp.minimum(frames, num_valid - 1))
    return index, jnp.where(num_valid > chunk_size, num_chunks, num_valid)[:, 0]


def uniform_monotone_steps(
    key: jax.Array, length: jax.Array, low: jax.Array, high: jax.Array, size: int, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> jax.Array:
    """(B, size) int32 whose first length (B,) entries form a non-decreasing sequence drawn uniformly among all integer
    sequences in [low, high] (B,), with 0 <= low <= high < num_steps; entries past length are unspecified."""
    batch_size = low.shape[0]
    if size == 0:
        return jnp.zeros((batch_size, 0), jnp.int32)
    num_positions = size + num_steps - 1
    positions = jnp.arange(num_positions, dtype=jnp.int32)[None, :]
    in_range = positions < (length + high - low)[:, None]
    priority = jnp.where(in_range, jax.random.uniform(key, (batch_size, num_positions)), 2.0)
    _, first = jax.lax.top_k(-priority, size)  # the `size` lowest priorities: a uniform random subset, in order
    first = jnp.where(jnp.arange(size)[None, :] < length[:, None], first, num_positions)
    chosen = jnp.sort(first, axis=1)  # p_0 < … < p_{length-1}
    return low[:, None] + chosen - jnp.arange(size, dtype=jnp.int32)[None, :]


def chunk_mixture_steps(
    key: jax.Array,
    num_chunks: jax.Array,
    size: int,
    probs: tuple[float, ...],
    mean: float = 0.0,
    std: float = 1.0,
    num_steps: int = NUM_TRAIN_TIMESTEPS,
) -> tuple[jax.Array, jax.Array]:
    """Integer steps per chunk from the mixture of `CHUNK_MODES` with weights probs (normalised here).

    num_chunks (B,) int: chunks of each sample, at most size. Returns (steps (B, size) int32 in [0, num_steps), 0 past
    a sample's num_chunks; mode (B,) int32 index into CHUNK_MODES).
    """
    mode_key, base_key, anchor_key, left_key, right_key, prefix_key = jax.random.split(key, 6)
    batch_size = num_chunks.shape[0]
    num_chunks = num_chunks.astype(jnp.int32)
    weights = jnp.asarray(probs, jnp.float32)
    mode = jax.random.categorical(mode_key, jnp.log(weights / jnp.sum(weights)), shape=(batch_size,)).astype(jnp.int32)
    base = sample_integer_steps(base_key, (batch_size,), mean, std, num_steps)
    if size == 1:
        return base[:, None], mode
    last = num_chunks - 1
    anchored_last = (mode == CHUNK_MODES.index("last_chunk_anchor")) | (mode == CHUNK_MODES.index("teacher_forcing_clean"))
    anchor = jnp.where(anchored_last, last, jax.random.randint(anchor_key, (batch_size,), 0, num_chunks))
    before = uniform_monotone_steps(left_key, anchor, jnp.zeros_like(base), base, size - 1, num_steps)
    after = uniform_monotone_steps(right_key, last - anchor, base, jnp.full_like(base, num_steps - 1), size - 1, num_steps)
    chunks = jnp.arange(size, dtype=jnp.int32)[None, :]
    anchor = anchor[:, None]
    from_before = jnp.take_along_axis(before, jnp.minimum(chunks, size - 2), axis=1)
    from_after = jnp.take_along_axis(after, jnp.clip(chunks - anchor - 1, 0, size - 2), axis=1)
    steps = jnp.where(chunks < anchor, from_before, jnp.where(chunks == anchor, base[:, None], from_after))
    steps = jnp.where((mode == CHUNK_MODES.index("same_t"))[:, None], base[:, None], steps)
    prefix = jax.random.randint(prefix_key, (batch_size,), 1, jnp.maximum(num_chunks, 2))
    teacher_forced = (mode == CHUNK_MODES.index("teacher_forcing_clean")) & (num_chunks >= 2)
    prefix = jnp.where(teacher_forced, prefix, 0)
    steps = jnp.where(chunks < prefix[:, None], 0, steps)
    return jnp.where(chunks < num_chunks[:, None], steps, 0), mode


def chunk_mixture_frame_steps(
    key: jax.Array,
    num_valid: jax.Array,
    num_frames: int,
    *,
    probs: tuple[float, ...],
    chunk_size: int,
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """(B, T) int32 training steps of upstream's chunk mixture for clips of num_valid (B,) leading valid frames."""
    chunk_key, frame_key = jax.random.split(key)
    index, num_chunks = frame_chunk_index(num_valid, num_frames, chunk_size)
    size = max_chunks(num_frames, chunk_size)
    chunk_steps, _ = chunk_mixture_steps(chunk_key, jnp.minimum(num_chunks, size), size, probs, mean, std)
    steps = jnp.take_along_axis(chunk_steps, jnp.minimum(index, size - 1), axis=1)
    per_frame = sample_integer_steps(frame_key, steps.shape, mean, std)
    return jnp.where((num_valid > chunk_size)[:, None], steps, per_frame)


def sample_frame_sigmas(
    key: jax.Array,
    batch_size: int,
    num_frames: int,
    *,
    shift: float,
    timestep_sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    chunk_mixture_probs: tuple[float, ...] = UPSTREAM_CHUNK_MIXTURE,
    chunk_size: int = UPSTREAM_CHUNK_SIZE,
    frame_valid_mask: jax.Array | None = None,
) -> jax.Array:
    """(B, T) float32 noise levels by `timestep_sampling` (see the module docstring); the chunk layout follows the
    leading valid frames of frame_valid_mask (B, T) when given."""
    if timestep_sampling == "logit_normal":
        return sample_sigmas(key, (batch_size, num_frames), shift, logit_mean, logit_std)
    if timestep_sampling != "chunk_mixture":
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    if frame_valid_mask is None:
        num_valid = jnp.full((batch_size,), num_frames, jnp.int32)
    else:
        num_valid = jnp.sum(frame_valid_mask.astype(jnp.int32), axis=1)
    steps = chunk_mixture_frame_steps(
        key, num_valid, num_frames, probs=chunk_mixture_probs, chunk_size=chunk_size, mean=logit_mean, std=logit_std
    )
    return sigmas_from_steps(steps, shift)


def sample_clean_first_frame(key: jax.Array, batch_size: int, probability: float) -> jax.Array:
    """(B,) bool: which samples condition on a clean frame 0."""
    return jax.random.bernoulli(key, probability, (batch_size,))


def sigmas_with_clean_first_frame(sigmas: jax.Array, clean_first: jax.Array) -> jax.Array:
    """sigmas (B, T) with frame 0 set to 0 where clean_first (B,) is true."""
    return sigmas.at[:, 0].set(jnp.where(clean_first, 0.0, sigmas[:, 0]))


def noise_latents(latents: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """x_σ = (1 − σ)·x0 + σ·ε with per-frame σ (B, T) broadcast over (B, T, H, W, C); float32."""
    sigma = sigmas[:, :, None, None, None]
    return (1.0 - sigma) * latents.astype(jnp.float32) + sigma * noise.astype(jnp.float32)


def velocity_target(latents: jax.Array, noise: jax.Array) -> jax.Array:
    """v = ε − x0, float32."""
    return noise.astype(jnp.float32) - latents.astype(jnp.float32)


def loss_frame_weights(clean_first: jax.Array, num_frames: int, frame_valid_mask: jax.Array | None = None) -> jax.Array:
    """(B, T) float32: 1 for frames in the loss, 0 for a clean frame 0 or a frame outside frame_valid_mask."""
    weights = jnp.ones((clean_first.shape[0], num_frames), jnp.float32)
    weights = weights.at[:, 0].set(jnp.where(clean_first, 0.0, 1.0))
    if frame_valid_mask is not None:
        weights = weights * frame_valid_mask.astype(jnp.float32)
    return weights


def masked_mse(prediction: jax.Array, target: jax.Array, frame_weights: jax.Array) -> jax.Array:
    """Mean squared error over the elements of weighted frames: prediction/target (B, T, H, W, C), weights (B, T).

    Statistics in float32; returns 0 when no frame is weighted.
    """
    if prediction.shape != target.shape or prediction.shape[:2] != frame_weights.shape:
        raise ValueError(
            f"prediction {prediction.shape}, target {target.shape} and frame weights {frame_weights.shape} disagree"
        )
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_frame = jnp.sum(squared, axis=(2, 3, 4))
    elements_per_frame = squared.shape[2] * squared.shape[3] * squared.shape[4]
    total_weight = jnp.sum(frame_weights) * elements_per_frame
    return jnp.sum(per_frame * frame_weights) / jnp.maximum(total_weight, 1.0)


def training_inputs(
    key: jax.Array,
    latents: jax.Array,
    *,
    shift: float,
    clean_first_frame_prob: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    frame_valid_mask: jax.Array | None = None,
    timestep_sampling: str = "logit_normal",
    chunk_mixture_probs: tuple[float, ...] = UPSTREAM_CHUNK_MIXTURE,
    chunk_size: int = UPSTREAM_CHUNK_SIZE,
) -> dict[str, jax.Array]:
    """Noised model input and loss terms for clean latents (B, T, H, W, C); noise levels by `sample_frame_sigmas`.

    Returns noisy_latents (B, T, H, W, C) float32, timesteps (B, T) = 1000·σ, target (B, T, H, W, C) = ε − x0,
    frame_weights (B, T) for `masked_mse`.
    """
    sigma_key, clean_key, noise_key = jax.random.split(key, 3)
    batch_size, num_frames = latents.shape[:2]
    clean_first = sample_clean_first_frame(clean_key, batch_size, clean_first_frame_prob)
    sigmas = sample_frame_sigmas(
        sigma_key, batch_size, num_frames, shift=shift, timestep_sampling=timestep_sampling, logit_mean=logit_mean,
        logit_std=logit_std, chunk_mixture_probs=chunk_mixture_probs, chunk_size=chunk_size,
        frame_valid_mask=frame_valid_mask,
    )
    sigmas = sigmas_with_clean_first_frame(sigmas, clean_first)
    noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    return {
        "noisy_latents": noise_latents(latents, noise, sigmas),
        "timesteps": NUM_TRAIN_TIMESTEPS * sigmas,
        "target": velocity_target(latents, noise),
        "frame_weights": loss_frame_weights(clean_first, num_frames, frame_valid_mask),
    }
