"""Our checkpoint format.

A model directory holds `config.json` (its config dataclass as JSON) and `params/` (an orbax PyTree checkpoint).
A full SANA-WM checkpoint, as written by `convert_torch_weights.py`, is a directory with one model directory per
component: `transformer/`, `vae/` and `text_encoder/` (the last also holds the tokenizer files).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(out_dir, params, config: dict) -> Path:
    """Write `config` and `params` (numpy or jax arrays) into `out_dir`, which must not already hold params."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR} already exists; choose an empty output directory")
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params)
    return out_dir


def read_config(model_dir) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_FILE}; expected a directory written by convert_torch_weights.py")
    return json.loads(path.read_text())


def restore_params(model_dir, abstract, sharding=None):
    """Restore params into the shapes/dtypes of `abstract` (a ShapeDtypeStruct tree; dtypes are cast on restore).

    `sharding` is a `jax.sharding.Sharding` for every parameter, or a pytree of them matching `abstract`; None places
    everything on the default device.
    """
    params_dir = Path(model_dir).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no {PARAMS_DIR}/ orbax checkpoint")
    if sharding is not None:
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(params_dir, abstract)


def component_dir(ckpt_dir, component: str) -> Path:
    """`ckpt_dir/component` when it exists, else `ckpt_dir` itself (a directory holding only that component)."""
    nested = Path(ckpt_dir) / component
    return nested if (nested / CONFIG_FILE).is_file() else Path(ckpt_dir)
