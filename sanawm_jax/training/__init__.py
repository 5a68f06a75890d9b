"""Stage-1 training: recipe config, flow-matching objective, sharded and resumable train loop."""

from sanawm_jax.training.config import TrainConfig
from sanawm_jax.training.loop import (
    Trainer,
    make_optimizer,
    restore_transformer,
    training_loss,
)

__all__ = ["TrainConfig", "Trainer", "make_optimizer", "restore_transformer", "training_loss"]
