"""Short DiT training runs on an example set held in memory, on one device, without the loader or checkpoints: the
stage-1 objective and train step of `training.loop` on batches drawn from arrays. For the embedded demo weights and
the ablations notebook, where a run is a few hundred steps of a tiny model.

    examples = {"latents": (N, T, h, w, C), "camera_conditions": (N, T, 20), "chunk_plucker": (N, T, h, w, 48),
                "text": (N, L, D), "text_mask": (N, L)}
    params, losses = train_in_memory(model_config, train_config, examples, null_text=(text (L, D), mask (L,)))

A run is a function of its arguments: the initial parameters come from `loop.init_key(seed)`, the batches and text
dropout from `numpy.random.default_rng(seed)`, the noise of step k from `loop.step_key(seed, k)`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, init_params
from sanawm_jax.training.config import TrainConfig
from sanawm_jax.training.loop import MODEL_INPUTS, init_key, make_optimizer, step_key, train_step_fn


@functools.cache
def train_step_program(model_config: SanaWMConfig, config: TrainConfig):
    """The jitted train step of `loop.train_step_fn`; one program per (model config, `config.step_settings()`), so
    runs that differ only in seed or length share it."""
    return jax.jit(train_step_fn(SanaWMTransformer(model_config), make_optimizer(config), config))


def draw_batch(examples: dict, null_text: tuple, rng: np.random.Generator, batch_size: int,
               text_dropout: float) -> dict:
    """batch_size examples drawn with replacement; each one's text replaced by the null text with probability
    text_dropout."""
    index = rng.integers(len(examples["latents"]), size=batch_size)
    batch = {name: np.asarray(examples[name])[index] for name in MODEL_INPUTS if name in examples}
    dropped = rng.random(batch_size) < text_dropout
    batch["text"][dropped], batch["text_mask"][dropped] = null_text
    return batch


def train_in_memory(model_config: SanaWMConfig, config: TrainConfig, examples: dict, null_text: tuple,
                    params=None, log=None) -> tuple[dict, list[float]]:
    """Train from `params` (default: `init_params` from config.seed) for config.num_steps steps of
    config.batch_size examples; `log(step, loss)` sees every step. Returns (params, the loss of every step)."""
    optimizer = make_optimizer(config)
    if params is None:
        params = init_params(model_config, init_key(config.seed))
    step = train_step_program(model_config, config.step_settings())
    opt_state = optimizer.init(params)
    null_text = tuple(np.asarray(part) for part in null_text)
    rng = np.random.default_rng(config.seed)
    losses = []
    for index in range(config.num_steps):
        batch = draw_batch(examples, null_text, rng, config.batch_size, config.text_dropout)
        params, opt_state, metrics = step(params, opt_state, batch, step_key(config.seed, index))
        losses.append(float(metrics["loss"]))
        if log is not None:
            log(index + 1, losses[-1])
    return params, losses
