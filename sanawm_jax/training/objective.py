"""Stage-1 flow-matching objective: per-frame noise levels, noising, velocity target and the masked loss.

Flow matching with x_σ = (1 − σ)·x0 + σ·ε and target v = ε − x0 (plain MSE, no timestep weighting). Every latent
frame draws its own σ (diffusion forcing): u = sigmoid(n), n ~ N(mean, std) (logit-normal), shifted by s to
σ = s·u / (1 + (s − 1)·u); the model receives 1000·σ. With probability `clean_first_frame_prob` a sample's frame 0
is the clean conditioning frame (σ = 0) and is left out of the loss.

Simplifications with respect to upstream's stage-1 recipe:
  - Upstream draws one base timestep per chunk of latent frames (first chunk of one frame plus one, then chunks of
    3) and mixes chunk patterns per sample (same_t 0.1, incremental 0.4, last_chunk_anchor 0.4,
    teacher_forcing_clean 0.1) with a monotone dynamic-programming sampler. Here every frame draws an independent
    σ; there is no chunk structure and no monotone schedule.
  - Upstream rounds t = ⌊1000·u⌋ to an integer training step before shifting; here u is continuous.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sanawm_jax.diffusion.scheduler import NUM_TRAIN_TIMESTEPS, shift_sigmas


def sample_sigmas(key: jax.Array, shape: tuple[int, ...], shift: float, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Shifted logit-normal noise levels of the given shape (e.g. (B, T)), float32 in (0, 1)."""
    logits = mean + std * jax.random.normal(key, shape, jnp.float32)
    return shift_sigmas(jax.nn.sigmoid(logits), shift)


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
) -> dict[str, jax.Array]:
    """Noised model input and loss terms for clean latents (B, T, H, W, C).

    Returns noisy_latents (B, T, H, W, C) float32, timesteps (B, T) = 1000·σ, target (B, T, H, W, C) = ε − x0,
    frame_weights (B, T) for `masked_mse`.
    """
    sigma_key, clean_key, noise_key = jax.random.split(key, 3)
    batch_size, num_frames = latents.shape[:2]
    clean_first = sample_clean_first_frame(clean_key, batch_size, clean_first_frame_prob)
    sigmas = sample_sigmas(sigma_key, (batch_size, num_frames), shift, logit_mean, logit_std)
    sigmas = sigmas_with_clean_first_frame(sigmas, clean_first)
    noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    return {
        "noisy_latents": noise_latents(latents, noise, sigmas),
        "timesteps": NUM_TRAIN_TIMESTEPS * sigmas,
        "target": velocity_target(latents, noise),
        "frame_weights": loss_frame_weights(clean_first, num_frames, frame_valid_mask),
    }
