"""Text encoders: Gemma-2 (stage 1, with prompt encoding as the pipeline does it) and Gemma-3 (the refiner's), in Flax,
with their checkpoint converters."""

from sanawm_jax.models.gemma.checkpoint import load_gemma2, load_gemma3
from sanawm_jax.models.gemma.encoder import (
    DEFAULT_CHI_PROMPT,
    PromptEmbeddings,
    TextEncoder,
    load_embeddings_npz,
    save_embeddings_npz,
)
from sanawm_jax.models.gemma.gemma2 import Gemma2Config, Gemma2Model
from sanawm_jax.models.gemma.gemma3 import Gemma3Config, Gemma3Model

__all__ = [
    "DEFAULT_CHI_PROMPT",
    "Gemma2Config",
    "Gemma2Model",
    "Gemma3Config",
    "Gemma3Model",
    "PromptEmbeddings",
    "TextEncoder",
    "load_embeddings_npz",
    "load_gemma2",
    "load_gemma3",
    "save_embeddings_npz",
]
