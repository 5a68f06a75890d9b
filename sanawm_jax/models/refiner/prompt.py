"""Prompt -> the refiner's text conditioning, as `SanaWMLTX2Refiner._encode_prompt` builds it.

The stripped prompt is tokenised with BOS, left-padded and truncated to `max_sequence_length` (1024) tokens; Gemma-3
returns every layer's hidden states (B, L, C, layers + 1); they are normalised per layer (`normalize_text_states`) and
the connectors turn them into (B, L, caption_channels) embeddings with their mask.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.gemma.gemma3 import Gemma3Config, Gemma3Model
from sanawm_jax.models.refiner.config import ConnectorsConfig
from sanawm_jax.models.refiner.connectors import TextConnectors, normalize_text_states

MAX_SEQUENCE_LENGTH = 1024


def tokenize_left(tokenizer, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (input_ids, attention_mask) (B, length) int32: stripped, BOS added, left-padded, truncated."""
    tokens = tokenizer([prompt.strip() for prompt in prompts], padding="max_length", padding_side="left",
                       max_length=length, truncation=True, add_special_tokens=True, return_tensors="np")
    return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)


@functools.cache
def encode_program(gemma_config: Gemma3Config, connectors_config: ConnectorsConfig):
    """The jitted ({"gemma", "connectors"} params, ids (B, L), mask (B, L)) -> (embeddings (B, L, caption_channels),
    mask); one per pair of configs, shared by every RefinerTextEncoder of them."""
    gemma, connectors = Gemma3Model(gemma_config), TextConnectors(connectors_config)

    def encode(params, ids, mask):
        states = gemma.apply({"params": params["gemma"]}, ids, mask)
        packed = normalize_text_states(states, jnp.sum(mask, axis=1)).astype(states.dtype)
        return connectors.apply({"params": params["connectors"]}, packed, mask)

    return jax.jit(encode)


class RefinerTextEncoder:
    """Gemma-3 + connectors: prompts -> (embeddings (B, L, caption_channels), mask (B, L) int32)."""

    def __init__(self, tokenizer, gemma_config: Gemma3Config, gemma_params, connectors_config: ConnectorsConfig,
                 connectors_params, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        registers = connectors_config.video_connector_num_learnable_registers
        if registers and max_sequence_length % registers:
            raise ValueError(f"max_sequence_length {max_sequence_length} must be a multiple of the connectors' "
                             f"{registers} learnable registers")
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.params = jax.device_put({"gemma": gemma_params, "connectors": connectors_params})
        self._encode = encode_program(gemma_config, connectors_config)

    def encode(self, prompts: str | Sequence[str]):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = tokenize_left(self.tokenizer, prompts, self.max_sequence_length)
        return self._encode(self.params, jnp.asarray(ids), jnp.asarray(mask))
