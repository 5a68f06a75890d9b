"""Stage-1 training settings (upstream recipe defaults)."""

from __future__ import annotations

import dataclasses

from sanawm_jax.frozen_config import FrozenConfig
from sanawm_jax.parallel import parse_mesh
from sanawm_jax.training.objective import (
    CHUNK_MODES,
    TIMESTEP_SAMPLING,
    UPSTREAM_CHUNK_MIXTURE,
    UPSTREAM_CHUNK_SIZE,
)

# Fields that shape the run (data, length, checkpoints, seed, devices) but not the computation of one train step.
RUN_FIELDS = (
    "text_dropout", "num_frames", "target_size", "batch_size", "num_steps", "checkpoint_every", "max_checkpoints",
    "seed", "mesh", "log_every",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig(FrozenConfig):
    """Optimiser, objective, data and run settings; the model (and its dtype policy) is a `SanaWMConfig`.

    learning_rate, betas, eps, weight_decay: AdamW at a constant learning rate (no warmup).
    grad_clip_norm: global gradient-norm clip applied before AdamW.
    flow_shift, logit_mean, logit_std: σ = shift(sigmoid(N(logit_mean, logit_std))).
    timestep_sampling: "logit_normal" (a continuous σ per frame) or "chunk_mixture" (upstream's stage-1 recipe:
        integer steps per chunk from the mixture of `objective.CHUNK_MODES` weighted by chunk_mixture_probs, chunks
        of timestep_chunk_size latent frames with the first one frame longer); see `training.objective`.
    clean_first_frame_prob: probability that frame 0 is the clean conditioning frame (then left out of the loss).
    text_dropout: probability of training on the null text embedding (the loader's caption dropout; the null
        embedding is the empty caption encoded as a prompt, see `data.cache.cache_text`).
    num_frames, target_size: pixel frames (8k+1) and (H, W) of the training clips.
    batch_size: examples per step over all processes (each loads batch_size / process count of them).
    num_steps, checkpoint_every, max_checkpoints: run length, checkpoint interval and how many checkpoints to keep.
    mesh: the device mesh as "AXIS=N,..." over data, fsdp, context, tensor (axes not named are 1; the product is the
        device count); "" puts every device on fsdp.
    log_every: steps per record of WORKDIR/metrics.jsonl and TensorBoard (means over those steps).
    """

    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-10
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.5
    flow_shift: float = 9.95
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_sampling: str = "logit_normal"
    chunk_mixture_probs: tuple[float, float, float, float] = UPSTREAM_CHUNK_MIXTURE
    timestep_chunk_size: int = UPSTREAM_CHUNK_SIZE
    clean_first_frame_prob: float = 0.9
    text_dropout: float = 0.1
    num_frames: int = 961
    target_size: tuple[int, int] = (704, 1280)
    batch_size: int = 1
    num_steps: int = 1000
    checkpoint_every: int = 50
    max_checkpoints: int = 3
    seed: int = 3407
    mesh: str = ""
    log_every: int = 1

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "target_size", tuple(self.target_size))
        object.__setattr__(self, "chunk_mixture_probs", tuple(float(p) for p in self.chunk_mixture_probs))
        checks = [
            (self.learning_rate > 0, "learning_rate must be positive"),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas must be two values in [0, 1)"),
            (self.eps > 0, "eps must be positive"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_clip_norm > 0, "grad_clip_norm must be positive"),
            (self.flow_shift > 0, "flow_shift must be positive"),
            (self.logit_std > 0, "logit_std must be positive"),
            (self.timestep_sampling in TIMESTEP_SAMPLING, f"timestep_sampling must be one of {TIMESTEP_SAMPLING}"),
            (len(self.chunk_mixture_probs) == len(CHUNK_MODES) and min(self.chunk_mixture_probs) >= 0
             and sum(self.chunk_mixture_probs) > 0,
             f"chunk_mixture_probs must be {len(CHUNK_MODES)} weights >= 0 of {CHUNK_MODES} with a positive sum"),
            (self.timestep_chunk_size >= 1, "timestep_chunk_size must be positive"),
            (0 <= self.clean_first_frame_prob <= 1, "clean_first_frame_prob must be in [0, 1]"),
            (0 <= self.text_dropout <= 1, "text_dropout must be in [0, 1]"),
            (self.num_frames >= 1 and (self.num_frames - 1) % 8 == 0, "num_frames must be 8k+1"),
            (self.batch_size >= 1, "batch_size must be positive"),
            (self.num_steps >= 0, "num_steps must be >= 0"),
            (self.checkpoint_every >= 1, "checkpoint_every must be positive"),
            (self.max_checkpoints >= 1, "max_checkpoints must be positive"),
            (self.mesh == "" or bool(parse_mesh(self.mesh)), "mesh must be AXIS=N,..."),
            (self.log_every >= 1, "log_every must be positive"),
        ]
        self.check(checks)

    def step_settings(self) -> "TrainConfig":
        """This config with every field that the train step does not read set to its default, so that runs
        differing only in data, length, seed or mesh share one compiled step."""
        defaults = TrainConfig()
        return self.replace(**{name: getattr(defaults, name) for name in RUN_FIELDS})
