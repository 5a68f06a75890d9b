"""Our checkpoint format: `<dir>/config.json` (a `SanaWMConfig`) + `<dir>/params` (an orbax PyTree checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sanawm_jax.config import SanaWMConfig
from sanawm_jax.transformer import SanaWMTransformer, abstract_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_transformer(out_dir, params, config: SanaWMConfig) -> Path:
    """Write params (numpy or jax arrays) and config; `out_dir` is created and must not already hold params."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR} already exists; choose an empty output directory")
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params)
    return out_dir


def read_config(ckpt_dir, **overrides) -> SanaWMConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {CONFIG_FILE}; expected a directory written by convert_torch_weights.py")
    return SanaWMConfig.from_dict(json.loads(path.read_text())).replace(**overrides)


def load_transformer(ckpt_dir, sharding=None, **config_overrides) -> tuple[SanaWMTransformer, dict]:
    """Restore `(model, params)` from a directory written by `save_transformer` / `convert_torch_weights.py`.

    config_overrides replace config fields (e.g. `param_dtype="bfloat16"` casts on restore, `dtype`, `gdn_impl`,
    `remat`). `sharding` is a `jax.sharding.Sharding` for every parameter, or a pytree of them matching params;
    None places everything on the default device.
    """
    config = read_config(ckpt_dir, **config_overrides)
    params_dir = Path(ckpt_dir).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no {PARAMS_DIR}/ orbax checkpoint")
    target = abstract_params(config)
    if sharding is not None:
        shardings = sharding if not isinstance(sharding, jax.sharding.Sharding) else jax.tree.map(lambda _: sharding, target)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(params_dir, target)
    return SanaWMTransformer(config), params
