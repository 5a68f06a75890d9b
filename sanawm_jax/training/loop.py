"""The stage-1 training loop: a jitted train step sharded on a device mesh and an orbax-checkpointed, exactly
resumable run, on one process or several (`parallel.distributed`).

    trainer = Trainer(model_config, train_config, workdir, dataset)    # resumes from workdir/checkpoints if any
    records = trainer.run()                                            # until train_config.num_steps

A checkpoint (every `checkpoint_every` steps and at the end of a run) holds params, optimiser state, the step and
the grain iterator state, so a run that is stopped and resumed consumes the same batches and the same per-step
random numbers (`jax.random.fold_in(key, step)`) as an uninterrupted one. Orbax commits a checkpoint by renaming its
finished temporary directory, so a run killed while saving leaves no partial checkpoint (its temporary directory is
removed when the next run starts). A checkpoint that cannot be restored is moved to `workdir/corrupt_checkpoints`
with a warning and the next older one is restored.

With several processes every process runs the Trainer on the same workdir: each loads its share of every batch,
checkpoints are written and restored collectively by orbax, and process 0 alone writes the configs and metrics.

Every `log_every` steps the run appends a record to `workdir/metrics.jsonl` and TensorBoard (see `metrics`); on an
interactive terminal a progress bar shows the steps.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import (
    SanaWMTransformer,
    abstract_params,
    init_params,
)
from sanawm_jax.parallel import batch_spec, make_mesh, param_shardings, parse_mesh
from sanawm_jax.parallel.distributed import barrier, global_batch
from sanawm_jax.training import objective
from sanawm_jax.training.config import TrainConfig
from sanawm_jax.training.metrics import MetricsWriter

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CONFIG_FILE = "train_config.json"
MODEL_INPUTS = ("latents", "camera_conditions", "chunk_plucker", "text", "text_mask", "frame_valid_mask")

logger = logging.getLogger(__name__)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW at a constant learning rate."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            config.learning_rate, b1=config.betas[0], b2=config.betas[1], eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )


def model_inputs(batch: dict) -> dict[str, np.ndarray]:
    """The arrays of a loader batch that the train step consumes (strings and bookkeeping dropped)."""
    missing = [name for name in MODEL_INPUTS[:5] if name not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: train on cached latents with a text store")
    return {name: np.asarray(batch[name]) for name in MODEL_INPUTS if name in batch}


def training_loss(params, model: SanaWMTransformer, batch: dict, key: jax.Array, config: TrainConfig) -> jax.Array:
    """Masked velocity MSE of one batch (see `objective`) with the noise drawn from `key`."""
    frame_valid_mask = batch.get("frame_valid_mask")
    inputs = objective.training_inputs(
        key, batch["latents"], shift=config.flow_shift, clean_first_frame_prob=config.clean_first_frame_prob,
        logit_mean=config.logit_mean, logit_std=config.logit_std, frame_valid_mask=frame_valid_mask,
        timestep_sampling=config.timestep_sampling, chunk_mixture_probs=config.chunk_mixture_probs,
        chunk_size=config.timestep_chunk_size,
    )
    velocity = model.apply(
        {"params": params}, inputs["noisy_latents"], inputs["timesteps"], batch["text"], batch["text_mask"],
        camera_conditions=batch["camera_conditions"], chunk_plucker=batch["chunk_plucker"],
        frame_valid_mask=frame_valid_mask,
    )
    return objective.masked_mse(velocity, inputs["target"], inputs["frame_weights"])


def init_key(seed: int) -> jax.Array:
    """The random key of the parameter initialisation."""
    return jax.random.split(jax.random.key(seed))[0]


def abstract_train_state(model_config: SanaWMConfig, optimizer: optax.GradientTransformation) -> dict:
    """{"params", "opt_state"} as ShapeDtypeStruct trees, without allocating anything."""
    abstract = abstract_params(model_config)
    return {"params": abstract, "opt_state": jax.eval_shape(optimizer.init, abstract)}


def step_key(seed: int, step: int) -> jax.Array:
    """The random key of training step `step`: independent of where a run was stopped and resumed."""
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], step)


def train_step_fn(model: SanaWMTransformer, optimizer: optax.GradientTransformation, config: TrainConfig):
    """(params, opt_state, batch, key) -> (params, opt_state, {"loss", "grad_norm"}): one optimiser step."""

    def train_step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(training_loss)(params, model, batch, key, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return train_step


@functools.cache
def train_step_program(model_config: SanaWMConfig, config: TrainConfig, mesh: Mesh, batch_size: int):
    """The jitted train step with params and optimiser state sharded over `mesh` by `parallel.param_shardings`
    (donated), a global batch of `batch_size` split along its leading axis by `parallel.batch_spec`; one program per
    (model config, `TrainConfig.step_settings()`, mesh, batch size), shared by every Trainer. Call it under
    `jax.set_mesh(mesh)` so that the model's activation constraints apply."""
    optimizer = make_optimizer(config)
    abstract = abstract_train_state(model_config, optimizer)
    batch = NamedSharding(mesh, batch_spec((batch_size,), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step_fn(SanaWMTransformer(model_config), optimizer, config),
        in_shardings=(param_shardings(abstract["params"], mesh), param_shardings(abstract["opt_state"], mesh), batch,
                      replicated),
        out_shardings=(param_shardings(abstract["params"], mesh), param_shardings(abstract["opt_state"], mesh),
                       replicated),
        donate_argnums=(0, 1),
    )


@functools.cache
def init_program(model_config: SanaWMConfig, mesh: Mesh):
    """key -> freshly initialised params, sharded over `mesh`."""
    shardings = param_shardings(abstract_params(model_config), mesh)
    return jax.jit(lambda key: init_params(model_config, key), out_shardings=shardings)


def tokens_per_step(model_config: SanaWMConfig, latents_shape: tuple[int, ...]) -> int:
    """DiT tokens of one step: batch x latent frames x spatial patches, for global latents (B, T, H, W, C)."""
    batch, frames, height, width, _ = latents_shape
    _, patch_h, patch_w = model_config.patch_size
    return batch * frames * (height // patch_h) * (width // patch_w)


def local_batch_size(config: TrainConfig) -> int:
    """Examples per step that this process loads: the global batch size over the process count."""
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch size {config.batch_size} is not divisible by the {jax.process_count()} processes")
    return config.batch_size // jax.process_count()


class Trainer:
    """Params and optimiser state sharded over a device mesh (`TrainConfig.mesh`), a batch iterator of this
    process's share of every batch, and a checkpoint manager in `workdir/checkpoints`. With `resume` (the default)
    the newest checkpoint there that restores is restored. One run per workdir: `train.py` holds `lock.WorkdirLock`
    around it."""

    def __init__(self, model_config: SanaWMConfig, config: TrainConfig, workdir, dataset, resume: bool = True):
        self.model_config = model_config
        self.config = config
        self.workdir = Path(workdir).absolute()
        self.model = SanaWMTransformer(model_config)
        self.optimizer = make_optimizer(config)
        self.mesh = make_mesh(parse_mesh(config.mesh) if config.mesh else None)
        self.abstract_state = abstract_train_state(model_config, self.optimizer)
        self.param_shardings = param_shardings(self.abstract_state["params"], self.mesh)
        self.opt_shardings = param_shardings(self.abstract_state["opt_state"], self.mesh)
        self.iterator = iter(dataset)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINT_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_checkpoints, enable_async_checkpointing=False, cleanup_tmp_directories=True
            ),
        )
        self._train_step = train_step_program(model_config, config.step_settings(), self.mesh, config.batch_size)
        self._compiled = False
        self.step = 0
        if resume and self.manager.latest_step() is not None:
            self._check_saved_model_config()
            self.restore_newest_intact()
        else:
            self._initialize()
            self._write_configs()
        self.metrics = MetricsWriter(self.workdir, self.step) if jax.process_index() == 0 else None

    def _initialize(self):
        self.params = init_program(self.model_config, self.mesh)(init_key(self.config.seed))
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.params)
        self.step = 0

    def _write_configs(self):
        if jax.process_index() != 0:
            return
        payload = {"model": self.model_config.to_dict(), "train": self.config.to_dict()}
        (self.workdir / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    def _check_saved_model_config(self):
        saved, _ = read_run_configs(self.workdir)
        if saved != self.model_config:
            raise ValueError(
                f"{self.workdir} holds checkpoints of another model config ({saved}); use a new workdir or the same "
                f"config ({self.model_config})"
            )

    def _sharded_abstract_state(self):
        shardings = {"params": self.param_shardings, "opt_state": self.opt_shardings}
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, shardings
        )

    def save(self):
        """Checkpoint params, optimiser state and iterator state under the current step."""
        state = {"params": self.params, "opt_state": self.opt_state}
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(self.iterator.get_state())
            ),
            force=True,
        )

    def restore(self, step: int):
        """Load the checkpoint of `step` into params, optimiser state and the iterator."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(self._sharded_abstract_state()), data=ocp.args.JsonRestore()),
        )
        self.params, self.opt_state = restored.state["params"], restored.state["opt_state"]
        self.iterator.set_state(restored.data)
        self.step = step
        logger.info("resumed from %s at step %d", self.workdir / CHECKPOINT_DIR, step)

    def restore_newest_intact(self):
        """Restore the newest checkpoint that restores; move the newer ones that fail aside (never delete them) so
        that this run neither overwrites nor garbage-collects them."""
        corrupt = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.restore(step)
                break
            except Exception as error:  # orbax/TensorStore raise several types for unreadable data
                if not corrupt:
                    first_error = error
                corrupt.append(step)
                logger.warning("checkpoint step %d in %s cannot be restored: %s", step,
                               self.workdir / CHECKPOINT_DIR, " ".join(str(error).split())[:300])
        else:
            raise ValueError(
                f"no checkpoint in {self.workdir / CHECKPOINT_DIR} can be restored (steps {corrupt}); the newest "
                f"fails with: {' '.join(str(first_error).split())[:300]}"
            ) from first_error
        for step in corrupt:
            target = self._move_aside(step)
            logger.warning("moved the corrupt checkpoint of step %d to %s; resuming from step %d", step, target,
                           self.step)
        if corrupt:
            self.manager.reload()

    def _move_aside(self, step: int) -> Path:
        source = self.workdir / CHECKPOINT_DIR / str(step)
        target = self.workdir / CORRUPT_DIR / str(step)
        suffix = 1
        while target.exists():
            target = self.workdir / CORRUPT_DIR / f"{step}-{suffix}"
            suffix += 1
        target.parent.mkdir(exist_ok=True)
        shutil.move(source, target)
        return target

    def train_step(self) -> dict:
        """One optimiser step on the next batch; returns the step number, loss, grad norm and the clip keys used."""
        start = time.perf_counter()
        batch = next(self.iterator)
        local = model_inputs(batch)
        key = step_key(self.config.seed, self.step)
        if not self._compiled:
            self._compile(local, key)
        inputs = global_batch(local, self.mesh)
        with jax.set_mesh(self.mesh):
            self.params, self.opt_state, metrics = self._train_step(self.params, self.opt_state, inputs, key)
        self.step += 1
        record = {"step": self.step, **{name: float(value) for name, value in metrics.items()}}
        record["step_time_s"] = time.perf_counter() - start  # float() above waited for the step
        record["tokens"] = tokens_per_step(self.model_config, inputs["latents"].shape)
        record["clips"] = [str(clip) for clip in np.asarray(batch.get("key", []))]
        return record

    def _compile(self, local: dict, key: jax.Array) -> None:
        """Compile the train step for the global batch of which `local` is this process's share, then wait until
        every process has compiled it, so that their first collectives start together however long each took to get
        there (see `parallel.distributed`)."""
        count = jax.process_count()
        shape = lambda value: (value.shape[0] * count, *value.shape[1:])
        abstract = {
            name: jax.ShapeDtypeStruct(shape(value), jax.dtypes.canonicalize_dtype(value.dtype),
                                       sharding=NamedSharding(self.mesh, batch_spec(shape(value), self.mesh)))
            for name, value in local.items()
        }
        with jax.set_mesh(self.mesh):
            self._train_step.lower(self.params, self.opt_state, abstract, key).compile()
        barrier("train step compiled")
        self._compiled = True

    def log(self, records: list[dict]) -> dict:
        """Write the metrics record of the steps in `records` (means of loss, grad norm and step time) to
        metrics.jsonl and TensorBoard; returns it."""
        step_time = float(np.mean([record["step_time_s"] for record in records]))
        logged = {
            "step": records[-1]["step"],
            "loss": float(np.mean([record["loss"] for record in records])),
            "grad_norm": float(np.mean([record["grad_norm"] for record in records])),
            "learning_rate": self.config.learning_rate,
            "step_time_s": step_time,
            "tokens_per_s": float(np.mean([record["tokens"] for record in records])) / step_time,
        }
        if self.metrics is not None:
            self.metrics.write(logged)
        logger.info("step %d loss %.6f grad_norm %.4f %.2f s/step", logged["step"], logged["loss"],
                    logged["grad_norm"], step_time)
        return logged

    def run(self, num_steps: int | None = None) -> list[dict]:
        """Train until step `num_steps` (default: the config's), checkpointing every `checkpoint_every` steps and
        at the end, logging every `log_every` steps and at the end; returns one record per step taken (see
        `train_step`)."""
        num_steps = self.config.num_steps if num_steps is None else num_steps
        records, unlogged = [], []
        bar = tqdm(total=num_steps, initial=self.step, desc="train", unit="step", disable=None, dynamic_ncols=True)
        with bar, logging_redirect_tqdm():
            while self.step < num_steps:
                record = self.train_step()
                records.append(record)
                unlogged.append(record)
                bar.update()
                if self.step % self.config.log_every == 0 or self.step == num_steps:
                    bar.set_postfix(loss=f"{self.log(unlogged)['loss']:.4f}")
                    unlogged = []
                if self.step % self.config.checkpoint_every == 0 or self.step == num_steps:
                    self.save()
        self.manager.wait_until_finished()
        return records

    def close(self):
        self.manager.close()
        if self.metrics is not None:
            self.metrics.close()


def read_run_configs(workdir) -> tuple[SanaWMConfig, TrainConfig]:
    """The model and train configs a training workdir was started with."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE}; not a training workdir")
    payload = json.loads(path.read_text())
    return SanaWMConfig.from_dict(payload["model"]), TrainConfig.from_dict(payload["train"])


def restore_transformer(workdir, step: int | None = None) -> tuple[SanaWMTransformer, dict]:
    """(model, params) of a training workdir's checkpoint at `step` (default: the latest), on the default device."""
    workdir = Path(workdir).absolute()
    model_config, config = read_run_configs(workdir)
    target = abstract_train_state(model_config, make_optimizer(config))
    with ocp.CheckpointManager(workdir / CHECKPOINT_DIR) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir / CHECKPOINT_DIR}: no checkpoint")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return SanaWMTransformer(model_config), restored.state["params"]
