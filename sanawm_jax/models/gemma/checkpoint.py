"""Hugging Face Gemma-2 / Gemma-3 checkpoint folders -> config + our parameter tree, one tensor at a time.

A folder holds `config.json` and either `model.safetensors` or shards listed by `model.safetensors.index.json`.
Keys are those of `Gemma2ForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...) or of a bare `Gemma2Model`
(no `model.` prefix). Naming: `layers.N` -> `layers_N`, `weight` -> `kernel` (Linear, transposed from (out, in) to
(in, out)), `scale` (norms) or `embedding` (`embed_tokens`). Conversion is strict (see `checkpoint.keymap`); the
language-model head, which the encoder does not use, is the one known-unused tensor.
Gemma-3 folders hold `Gemma3ForConditionalGeneration` (text weights under `model.language_model.`, or
`language_model.model.` as older transformers saved them; the vision tower, multimodal projector and head are skipped
and listed in one line) or a bare `Gemma3TextModel`/`Gemma3ForCausalLM`.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp

from sanawm_jax.checkpoint.keymap import convert_tensors, flatten, torch_name
from sanawm_jax.checkpoint.torch_sources import (
    SafetensorsSource,
    read_json,
    read_safetensors_header,
    read_sharded_index,
)
from sanawm_jax.models.gemma.gemma2 import Gemma2Config, Gemma2Model
from sanawm_jax.models.gemma.gemma3 import Gemma3Config, Gemma3Model

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
CAUSAL_LM_PREFIX = "model."
KNOWN_UNUSED = ("lm_head.weight",)
GEMMA3_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
GEMMA3_UNUSED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.|(^|\.)lm_head\.weight$")


def open_hf_safetensors(folder: str | Path) -> SafetensorsSource:
    """Lazy reader over a Hugging Face model folder's safetensors (single file or indexed shards); its `config`
    attribute holds the parsed config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such Gemma checkpoint folder")
    config_path, single, index_path = folder / "config.json", folder / HF_WEIGHTS, folder / HF_INDEX
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face Gemma folder)")
    config = read_json(config_path)
    if single.is_file():
        return SafetensorsSource(read_safetensors_header(single), f"Gemma folder {folder} (1 file)", config)
    if not index_path.is_file():
        raise ValueError(f"{folder}: no weights ({HF_WEIGHTS} or {HF_INDEX})")
    entries, num_shards = read_sharded_index(index_path)
    return SafetensorsSource(entries, f"Gemma folder {folder} ({num_shards} shards)", config)


def abstract_gemma2_params(config: Gemma2Config) -> dict:
    """Parameter tree of `Gemma2Model(config)` as ShapeDtypeStructs (nothing allocated)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(Gemma2Model(config).init, jax.random.key(0), ids, jnp.ones((1, 1), jnp.int32))
    return variables["params"]


def hf_key(path: tuple[str, ...]) -> str:
    """("layers_3", "self_attn", "q_proj", "kernel") -> "layers.3.self_attn.q_proj.weight" (without prefix)."""
    return torch_name(path, numbered="layers")


def convert_gemma2_params(source, config: Gemma2Config, log=print) -> dict:
    """Convert a `TensorSource` holding Gemma-2 weights into a params tree of numpy arrays in `config.param_dtype`.

    Keys and shapes are all checked before any tensor is read.
    """
    prefix = CAUSAL_LM_PREFIX if CAUSAL_LM_PREFIX + "embed_tokens.weight" in source.keys() else ""
    expected = flatten(abstract_gemma2_params(config))
    return convert_tensors(source, expected, lambda path: prefix + hf_key(path), "the Gemma-2 config",
                           lambda key: key in KNOWN_UNUSED, log)


def load_gemma2(folder: str | Path, *, param_dtype: str = "float32", dtype: str = "float32", log=print):
    """Read a Hugging Face Gemma-2 folder -> (Gemma2Config, params tree of numpy arrays in `param_dtype`)."""
    source = open_hf_safetensors(folder)
    config = Gemma2Config.from_hf_config(source.config, param_dtype=param_dtype, dtype=dtype)
    return config, convert_gemma2_params(source, config, log)


def abstract_gemma3_params(config: Gemma3Config) -> dict:
    """Parameter tree of `Gemma3Model(config)` as ShapeDtypeStructs (nothing allocated)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(Gemma3Model(config).init, jax.random.key(0), ids, jnp.ones((1, 1), jnp.int32))
    return variables["params"]


def gemma3_naming(source):
    """(path -> source key, is-unused predicate) for a source holding Gemma-3 weights under any known prefix."""
    keys = set(source.keys())
    prefix = next((p for p in GEMMA3_PREFIXES if p + "embed_tokens.weight" in keys), "")
    return (lambda path: prefix + hf_key(path)), (lambda key: bool(GEMMA3_UNUSED.search(key)))


def convert_gemma3_params(source, config: Gemma3Config, log=print) -> dict:
    """A `TensorSource` holding Gemma-3 weights -> params tree of numpy arrays in `config.param_dtype` (strict;
    vision tower, projector and head skipped)."""
    to_key, is_unused = gemma3_naming(source)
    return convert_tensors(source, flatten(abstract_gemma3_params(config)), to_key, "the Gemma-3 config", is_unused,
                           log)


def load_gemma3(folder: str | Path, *, param_dtype: str = "float32", dtype: str = "float32", log=print):
    """Read a Hugging Face Gemma-3 folder -> (Gemma3Config, params tree of numpy arrays in `param_dtype`)."""
    source = open_hf_safetensors(folder)
    config = Gemma3Config.from_hf_config(source.config, param_dtype=param_dtype, dtype=dtype)
    return config, convert_gemma3_params(source, config, log)
