"""The grain input pipeline: seeded shuffle, per-process shard, epochs, per-clip example building with a bad-data
policy, threaded reading, batching, and a checkpointable iterator.

    dataset = make_dataset(ClipDirectorySource(path), DataConfig(num_frames=17, target_size=(64, 96)))
    iterator = iter(dataset)
    batch = next(iterator)              # dict of numpy arrays with a leading batch axis
    state = iterator.get_state()        # JSON-serialisable; iterator.set_state(state) resumes exactly here

Indices are shuffled globally (a new permutation each epoch). With n processes loading batches of b examples each,
process p takes rows [p*b, (p+1)*b) of every global batch of n*b consecutive positions, so the processes see
disjoint parts that together make the whole stream, and the global batch (the processes' batches stacked in process
order) is the batch one process with batch size n*b would load. Each example's randomness
(temporal window, caption dropout) comes from a generator seeded by the pipeline seed and the example's position,
so restoring a state replays exactly the batches an uninterrupted iterator would have produced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import grain
import jax
import numpy as np

from sanawm_jax import camera
from sanawm_jax.data import transforms
from sanawm_jax.data.format import TextEmbeddingStore
from sanawm_jax.data.sources import BadClipError
from sanawm_jax.frozen_config import FrozenConfig

BAD_CLIP_POLICIES = ("reject", "raise")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig(FrozenConfig):
    """What the loader produces.

    num_frames: pixel frames per example, 8k+1 (the latent frames are (num_frames - 1) // 8 + 1).
    target_size: (H, W) of the frames the model sees; divisible by the spatial VAE stride.
    batch_size: examples per batch on this process.
    random_window: start video windows at a random frame (cached latents always start at frame 0).
    caption_dropout: probability of replacing the text embedding by the null embedding (upstream trains with 0.1).
    on_bad_clip: "reject" skips a bad clip, logging and counting its reason; "raise" raises BadClipError.
    num_epochs: passes over the data, None for endless.
    num_threads, prefetch_buffer_size: grain reading threads and buffered examples on this process.
    """

    num_frames: int = 961
    target_size: tuple[int, int] = camera.TARGET_SIZE
    vae_stride: tuple[int, int, int] = camera.VAE_STRIDE
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    random_window: bool = True
    caption_dropout: float = 0.0
    on_bad_clip: str = "reject"
    drop_remainder: bool = True
    num_threads: int = 2
    prefetch_buffer_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "target_size", tuple(self.target_size))
        object.__setattr__(self, "vae_stride", tuple(self.vae_stride))
        time_stride, height_stride, width_stride = self.vae_stride
        checks = [
            (self.num_frames >= 1 and (self.num_frames - 1) % time_stride == 0, f"num_frames must be {time_stride}k+1"),
            (
                self.target_size[0] % height_stride == 0 and self.target_size[1] % width_stride == 0,
                "target_size must be divisible by the spatial VAE stride",
            ),
            (self.batch_size >= 1, "batch_size must be positive"),
            (0.0 <= self.caption_dropout <= 1.0, "caption_dropout must be in [0, 1]"),
            (self.on_bad_clip in BAD_CLIP_POLICIES, f"on_bad_clip must be one of {BAD_CLIP_POLICIES}"),
            (self.num_epochs is None or self.num_epochs >= 1, "num_epochs must be positive or None"),
        ]
        self.check(checks)


class RejectedClips:
    """Bad clips the loader skipped: clip key -> reason (thread-safe; a clip read twice counts once)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}

    def add(self, error: BadClipError) -> None:
        with self._lock:
            is_new = error.key not in self._reasons
            self._reasons[error.key] = error.reason
        if is_new:
            logger.warning("rejected %s", error)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._reasons)

    def reasons(self) -> dict[str, str]:
        with self._lock:
            return dict(self._reasons)


class ExampleBuilder:
    """Index into the source -> example dict, or None for a rejected clip (grain drops Nones)."""

    def __init__(self, source, config: DataConfig, text_store: TextEmbeddingStore | None, rejected: RejectedClips):
        self.source = source
        self.config = config
        self.text_store = text_store
        self.rejected = rejected

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            return self.build(int(index), rng)
        except BadClipError as error:
            if self.config.on_bad_clip == "raise":
                raise
            self.rejected.add(error)
            return None

    def build(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        config = self.config
        record = self.source[index]
        transforms.check_record(record, config.num_frames, self.text_store)
        start = transforms.window_start(record, config.num_frames, rng if config.random_window else None)
        clip = transforms.read_window(record, index, config.num_frames, config.vae_stride[0], start)
        clip = transforms.resize_crop(clip, config.target_size)
        clip = transforms.metric_relative_poses(clip)
        clip = transforms.attach_camera_tensors(clip, config.target_size, config.vae_stride)
        if self.text_store is not None:
            clip = transforms.attach_text(clip, self.text_store, config.caption_dropout, rng)
        return transforms.to_example(clip)


def process_share(dataset: grain.MapDataset, process_index: int, process_count: int,
                  batch_size: int) -> grain.MapDataset:
    """Process `process_index`'s rows of every global batch: local position k is global position
    (k // b) * b * n + process_index * b + k % b for b = batch_size, n = process_count."""
    size = batch_size * process_count

    def element(k: int):
        return dataset[(k // batch_size) * size + process_index * batch_size + k % batch_size]

    return grain.MapDataset.range(len(dataset) // size * batch_size).map(element)


def make_dataset(
    source,
    config: DataConfig,
    text_store: TextEmbeddingStore | None = None,
    *,
    rejected: RejectedClips | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of examples (see `transforms.to_example`) from a clip source.

    process_index / process_count default to `jax.process_index()` / `jax.process_count()`; pass `rejected` to
    observe the clips the "reject" policy skipped.
    """
    if len(source) == 0:
        raise ValueError(f"source {source!r} has no clips")
    if text_store is None and config.caption_dropout > 0:
        raise ValueError("caption_dropout needs a text_store holding the null embedding")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    builder = ExampleBuilder(source, config, text_store, rejected if rejected is not None else RejectedClips())

    dataset = grain.MapDataset.range(len(source))
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    # Examples are built (lazily) before sharding so their randomness depends on the global position only.
    dataset = dataset.random_map(builder, seed=config.seed)
    dataset = dataset.repeat(config.num_epochs)
    if process_count > 1:
        dataset = process_share(dataset, process_index, process_count, config.batch_size)
    read_options = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    return dataset.to_iter_dataset(read_options).batch(config.batch_size, drop_remainder=config.drop_remainder)
