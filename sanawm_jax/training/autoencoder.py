"""Training the LTX-2 video VAE as an autoencoder on videos held in memory: pixel reconstruction MSE of a posterior
sample plus a weighted KL term of the diagonal Gaussian posterior, on random space-time crops (the VAE is
convolutional, so crops train it for any frame size); then the per-channel latent statistics.

Training starts from `initial_params`: the default initialisation with the decoder's output convolution and the
last convolution of every resnet set to zero, so the decoder starts as a flat grey image and each resnet as the
identity. From the default initialisation the decoder's first steps erase its random-noise output the only way
its parameter-free RMS norms allow, by growing a position-independent component that then dominates every norm's
input; the latents' share of the signal shrinks with it and the decoder stays on the clip's mean colour.

    params, history = train_autoencoder(vae_config, videos, AutoencoderConfig(num_steps=300))
    params = with_latent_statistics(params, vae_config, videos)   # `codec.encode` then gives ~N(0, 1) latents

videos (N, F, H, W, 3) float32 in [-1, 1]. A run is a function of its arguments: the crops come from
`numpy.random.default_rng(seed)` and the posterior noise of step k from `fold_in(key(seed), k)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.models.ltx2_vae import VAEConfig, VideoAutoencoder, init_vae_params
from sanawm_jax.models.ltx2_vae.codec import check_video

LOG_VARIANCE_RANGE = (-30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(FrozenConfig):
    """learning_rate: Adam peak rate, cosine-decayed to 10% over num_steps, after global-norm clipping at 1.
    kl_weight: weight of the KL divergence (mean over latent elements) against the pixel MSE (mean over pixels).
    sample_posterior: decode a posterior sample (the VAE objective) rather than the posterior mode. The pipeline
        encodes with the mode, and on a budget of a few hundred CPU steps the sampling noise (unit variance at
        initialisation) drowns the latents, so the default decodes the mode; the KL term still regularises the
        posterior's means and log-variance.
    batch_size, num_frames, crop_size: crops per step, their frames (8k+1) and (H, W) (multiples of 32, >= 64).
    """

    learning_rate: float = 2e-3
    kl_weight: float = 1e-4
    batch_size: int = 4
    num_frames: int = 9
    crop_size: tuple[int, int] = (64, 96)
    num_steps: int = 300
    seed: int = 0
    sample_posterior: bool = False

    def __post_init__(self):
        object.__setattr__(self, "crop_size", tuple(self.crop_size))
        self.check([
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.kl_weight >= 0, "kl_weight must be >= 0"),
            (self.batch_size >= 1, "batch_size must be positive"),
            (self.num_frames >= 1, "num_frames must be positive"),
            (self.num_steps >= 0, "num_steps must be >= 0"),
        ])


def initial_params(vae_config: VAEConfig, seed: int) -> dict:
    """`init_vae_params` from `jax.random.key(seed)` with the decoder's `conv_out` and every resnet's `conv2`
    (encoder and decoder) zeroed."""
    params = init_vae_params(vae_config, jax.random.key(seed))

    def zero_outputs(path, leaf):
        names = [str(key.key) for key in path]
        is_output = names[:2] == ["decoder", "conv_out"] or (
            len(names) >= 3 and names[-3] == "conv2" and names[-4].startswith("resnets_"))
        return jnp.zeros_like(leaf) if is_output else leaf

    return jax.tree_util.tree_map_with_path(zero_outputs, params)


def autoencoder_loss(params, video, key, vae_config: VAEConfig, kl_weight: float, sample_posterior: bool = True):
    """(loss, {"mse", "kl"}) of one batch video (B, F, H, W, 3) in [-1, 1]: MSE of the decoded posterior sample
    (the mode without `sample_posterior`) against the input plus kl_weight x the mean per-element
    KL(q(z|x) || N(0, 1)). The latent statistics (`latents_mean`, `latents_std`) take no part and get zero
    gradients."""
    model = VideoAutoencoder(vae_config)
    mean, log_variance = model.apply({"params": params}, video, method="posterior")
    log_variance = jnp.clip(log_variance, *LOG_VARIANCE_RANGE)[..., None]
    latents = mean
    if sample_posterior:
        latents = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, jnp.float32)
    reconstruction = model.apply({"params": params}, latents, method="decode_raw")
    mse = jnp.mean((reconstruction - video) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(log_variance) - 1.0 - log_variance)
    return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def random_crops(videos: np.ndarray, rng: np.random.Generator, batch_size: int, num_frames: int,
                 crop_size: tuple[int, int]) -> np.ndarray:
    """(batch_size, num_frames, *crop_size, 3) crops of random clips at random frame and pixel offsets."""
    _, frames, height, width, _ = videos.shape
    crop_h, crop_w = crop_size
    if num_frames > frames or crop_h > height or crop_w > width:
        raise ValueError(f"crops of {num_frames}x{crop_h}x{crop_w} do not fit videos of {frames}x{height}x{width}")
    crops = []
    for _ in range(batch_size):
        clip = rng.integers(len(videos))
        t, y, x = (rng.integers(n - c + 1) for n, c in ((frames, num_frames), (height, crop_h), (width, crop_w)))
        crops.append(videos[clip, t:t + num_frames, y:y + crop_h, x:x + crop_w])
    return np.stack(crops)


def make_optimizer(config: AutoencoderConfig) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.num_steps, 1), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


@functools.cache
def train_step_program(vae_config: VAEConfig, config: AutoencoderConfig):
    """(params, opt_state, video, key) -> (params, opt_state, {"loss", "mse", "kl"}), jitted; one program per
    (VAE config, training config), so runs that differ only in seed share it."""
    optimizer = make_optimizer(config)

    def step(params, opt_state, video, key):
        (loss, parts), grads = jax.value_and_grad(autoencoder_loss, has_aux=True)(
            params, video, key, vae_config, config.kl_weight, config.sample_posterior)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **parts}

    return jax.jit(step)


def train_autoencoder(vae_config: VAEConfig, videos, config: AutoencoderConfig, params=None,
                      log=None) -> tuple[dict, list[dict]]:
    """Train from `params` (default: `initial_params` from the config's seed) for config.num_steps steps on crops
    of videos (N, F, H, W, 3) in [-1, 1]; `log(record)` sees every step's record. Returns (params, one record
    {"step", "loss", "mse", "kl"} per step)."""
    videos = np.asarray(videos, np.float32)
    check_video((config.batch_size, config.num_frames, *config.crop_size, 3), vae_config)
    if params is None:
        params = initial_params(vae_config, config.seed)
    step = train_step_program(vae_config, config.replace(seed=0))
    opt_state = make_optimizer(config).init(params)
    rng, key = np.random.default_rng(config.seed), jax.random.key(config.seed)
    history = []
    for index in range(config.num_steps):
        batch = random_crops(videos, rng, config.batch_size, config.num_frames, config.crop_size)
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, index))
        history.append({"step": index + 1, **{name: float(value) for name, value in metrics.items()}})
        if log is not None:
            log(history[-1])
    return params, history


@functools.cache
def posterior_mean_program(vae_config: VAEConfig):
    """The jitted (params, video (B, F, H, W, 3)) -> posterior mean latents (B, f, h, w, C); one per VAE config."""
    return jax.jit(lambda params, video: VideoAutoencoder(vae_config).apply({"params": params}, video,
                                                                             method="posterior")[0])


def with_latent_statistics(params: dict, vae_config: VAEConfig, videos) -> dict:
    """`params` with `latents_mean` / `latents_std` set to the per-channel mean and standard deviation of the
    posterior means of videos (N, F, H, W, 3) (encoded one clip at a time)."""
    encode = posterior_mean_program(vae_config)
    means = np.concatenate([np.asarray(encode(params, video[None])).reshape(-1, vae_config.latent_channels)
                            for video in np.asarray(videos, np.float32)])
    return {**params, "latents_mean": jnp.asarray(means.mean(0), jnp.float32),
            "latents_std": jnp.asarray(means.std(0), jnp.float32)}
