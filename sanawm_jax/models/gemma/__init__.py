"""The stage-1 text encoder: Gemma-2 in Flax, its checkpoint converter, and prompt encoding as the pipeline does it."""

from sanawm_jax.models.gemma.checkpoint import load_gemma2
from sanawm_jax.models.gemma.encoder import (
    DEFAULT_CHI_PROMPT,
    PromptEmbeddings,
    TextEncoder,
    load_embeddings_npz,
    save_embeddings_npz,
)
from sanawm_jax.models.gemma.gemma2 import Gemma2Config, Gemma2Model

__all__ = [
    "DEFAULT_CHI_PROMPT",
    "Gemma2Config",
    "Gemma2Model",
    "PromptEmbeddings",
    "TextEncoder",
    "load_embeddings_npz",
    "load_gemma2",
    "save_embeddings_npz",
]
