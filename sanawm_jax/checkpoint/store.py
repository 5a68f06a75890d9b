"""Our checkpoint format.

A model directory holds `config.json` (its config dataclass as JSON) and `params/` (an orbax PyTree checkpoint, or
for models converted shard by shard, `params/part-NNNNN/` orbax checkpoints of disjoint parts of the tree).
A full SANA-WM checkpoint, as written by `convert_torch_weights.py`, is a directory with one model directory per
component: `transformer/`, `vae/` and `text_encoder/` (the last also holds the tokenizer files).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sanawm_jax.checkpoint.keymap import flatten, unflatten

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PART_PREFIX = "part-"


def _start_params_dir(out_dir, config: dict) -> Path:
    """Create `out_dir` (which must not already hold params) and write `config` into it."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR} already exists; choose an empty output directory")
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def save_params(out_dir, params, config: dict) -> Path:
    """Write `config` and `params` (numpy or jax arrays) into `out_dir`, which must not already hold params."""
    out_dir = _start_params_dir(out_dir, config)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params)
    return out_dir


def save_params_in_parts(out_dir, parts, config: dict) -> Path:
    """Like `save_params`, from an iterable of flat {path tuple: array} parts written one at a time (the caller's
    memory holds one part)."""
    out_dir = _start_params_dir(out_dir, config)
    with ocp.StandardCheckpointer() as checkpointer:
        for index, part in enumerate(parts):
            checkpointer.save(out_dir / PARAMS_DIR / f"{PART_PREFIX}{index:05d}", unflatten(part))
            checkpointer.wait_until_finished()
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
    check_saved_shapes(params_dir, abstract)
    if sharding is not None:
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
    parts = _parts(params_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        if not parts:
            return checkpointer.restore(params_dir, abstract)
        wanted = flatten(abstract)
        restored = {}
        for part in parts:
            names = _saved_shapes(checkpointer, part)
            subset = {path: leaf for path, leaf in wanted.items() if "/".join(path) in names}
            restored.update(flatten(checkpointer.restore(part, unflatten(subset))))
        return unflatten(restored)


def _parts(params_dir: Path) -> list[Path]:
    return sorted(path for path in params_dir.glob(PART_PREFIX + "*") if path.is_dir())


def _saved_shapes(checkpointer, params_dir: Path) -> dict[str, tuple[int, ...]]:
    metadata = checkpointer.metadata(params_dir)
    return {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(
        getattr(metadata.item_metadata, "tree", metadata.item_metadata))}


def check_saved_shapes(params_dir: Path, abstract) -> None:
    """Raise a one-line ValueError naming the first parameter whose saved shape (orbax metadata) differs from
    `abstract`, or that only one of them has."""
    with ocp.StandardCheckpointer() as checkpointer:
        saved = {}
        for part in _parts(params_dir) or [params_dir]:
            saved.update(_saved_shapes(checkpointer, part))
    wanted = {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    for name in sorted(saved.keys() | wanted.keys()):
        if saved.get(name) != wanted.get(name):
            raise ValueError(
                f"{params_dir.parent}: parameter {name} is saved with shape {_shape(saved.get(name))} but the model "
                f"config expects {_shape(wanted.get(name))}; the checkpoint was converted for another config"
            )


def _name(path) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "(absent)" if shape is None else str(shape)


@contextlib.contextmanager
def staged_directory(out_dir):
    """Yield a temporary sibling of `out_dir` to write into; it is renamed to `out_dir` on success and deleted on
    failure, so a failed run leaves nothing behind (staging folders of killed runs are removed by the next run).
    `out_dir` must not exist or be an empty directory."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.partial-"
    for stale in out_dir.parent.glob(glob.escape(prefix) + "*"):  # left by runs that were killed
        pid = stale.name.removeprefix(prefix)
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def component_dir(ckpt_dir, component: str) -> Path:
    """`ckpt_dir/component` when it exists, else `ckpt_dir` itself (a directory holding only that component)."""
    nested = Path(ckpt_dir) / component
    return nested if (nested / CONFIG_FILE).is_file() else Path(ckpt_dir)
