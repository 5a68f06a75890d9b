"""Pose-annotated clips: on-disk formats, grain sources and pipeline, caching CLIs, synthetic scenes, evaluation."""

from sanawm_jax.data.format import (
    ClipMetadata,
    TextEmbeddingStore,
    read_index,
    write_clip,
    write_index,
)
from sanawm_jax.data.pipeline import DataConfig, RejectedClips, make_dataset
from sanawm_jax.data.sources import (
    BadClipError,
    ClipDirectorySource,
    ClipRecord,
    UpstreamZipSource,
)

__all__ = [
    "BadClipError",
    "ClipDirectorySource",
    "ClipMetadata",
    "ClipRecord",
    "DataConfig",
    "RejectedClips",
    "TextEmbeddingStore",
    "UpstreamZipSource",
    "make_dataset",
    "read_index",
    "write_clip",
    "write_index",
]
