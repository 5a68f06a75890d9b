"""Lazy, one-tensor-at-a-time readers for released PyTorch checkpoints.

`open_torch_checkpoint` recognises three layouts:
  * a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`, or sharded
    `diffusion_pytorch_model-0000X-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`),
    or a pipeline root holding one in a subfolder (`transformer/` by default);
  * a flat `.safetensors` file (the NVlabs DiT layout);
  * a torch pickle (`.pt`, `.pth`, `.bin`), such as the streaming model's {"generator": state_dict, ...}.

Safetensors files are read without torch: the header is parsed once and `load` reads only the requested tensor's
byte range. Torch pickles are memory-mapped by `torch.load(mmap=True)` when they use the zip format.

`load` returns a numpy array in the stored dtype, except BF16, which is widened (exactly) to float32;
`dtype_name` always reports the stored dtype ("F32", "BF16", ...).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TORCH_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
STRIPPED_PREFIXES = ("module.", "model.")
# Names that PyTorch wrappers insert into state-dict keys (FSDP, activation checkpointing, torch.compile); no model
# module is called so, so they are dropped wherever they occur.
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
STATE_DICT_KEYS = ("generator", "state_dict", "model")


class TensorSource(abc.ABC):
    """Named tensors of one checkpoint, read one at a time.

    Attributes:
      config: the diffusers `config.json` contents when the source is a diffusers folder, else None.
      description: a short human-readable account of what was opened.
      path: the file or folder that was opened (None for an in-memory state dict).
      top_level: the keys of a torch pickle's top-level dict (e.g. ("critic", "generator", "step")), else ().
    """

    def __init__(self, description: str, config: dict[str, Any] | None = None, path: Path | None = None,
                 top_level: tuple[str, ...] = ()):
        self.description = description
        self.config = config
        self.path = path
        self.top_level = top_level

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Sorted tensor names (after prefix handling)."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading its data."""

    @abc.abstractmethod
    def dtype_name(self, key: str) -> str:
        """Stored dtype in safetensors spelling: "F32", "BF16", ..."""

    @abc.abstractmethod
    def load(self, key: str) -> np.ndarray:
        """Read one tensor; BF16 comes back as float32, other dtypes unchanged."""

    def location(self, key: str) -> str:
        """The file holding a tensor (shards are converted one at a time); "" when all live together."""
        return ""

    def _missing(self, key: str) -> KeyError:
        return KeyError(f"no tensor {key!r} in {self.description}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


@dataclasses.dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor lives: its file, stored dtype, shape and absolute byte range."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsSource(TensorSource):
    """Tensors spread over one or more safetensors files, described by their parsed headers."""

    def __init__(self, entries: dict[str, SafetensorsEntry], description: str, config: dict[str, Any] | None = None,
                 path: Path | None = None):
        super().__init__(description, config, path)
        self._entries = entries

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, key: str) -> SafetensorsEntry:
        if key not in self._entries:
            raise self._missing(key)
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype_name(self, key: str) -> str:
        return self._entry(key).dtype

    def location(self, key: str) -> str:
        return str(self._entry(key).path)

    def load(self, key: str) -> np.ndarray:
        entry = self._entry(key)
        out = np.empty(entry.shape, SAFETENSORS_DTYPES[entry.dtype])
        with open(entry.path, "rb") as f:
            f.seek(entry.start)
            read = f.readinto(out.reshape(-1).view(np.uint8))
        if read != entry.end - entry.start:
            raise ValueError(f"{entry.path}: truncated while reading tensor {key!r}")
        if entry.dtype == "BF16":
            return out.astype(np.float32)
        return out


class TorchStateDictSource(TensorSource):
    """A state dict of torch tensors (memory-mapped when the pickle allows it)."""

    def __init__(self, state: dict[str, Any], description: str, path: Path | None = None,
                 top_level: tuple[str, ...] = ()):
        super().__init__(description, path=path, top_level=top_level)
        self._state = state

    def keys(self) -> list[str]:
        return sorted(self._state)

    def _tensor(self, key: str):
        if key not in self._state:
            raise self._missing(key)
        return self._state[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype_name(self, key: str) -> str:
        return TORCH_DTYPE_NAMES[str(self._tensor(key).dtype).removeprefix("torch.")]

    def load(self, key: str) -> np.ndarray:
        import torch

        tensor = self._tensor(key).detach()
        target = torch.float32 if tensor.dtype == torch.bfloat16 else tensor.dtype
        return tensor.to(dtype=target, copy=True).numpy()


def read_safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check every byte range against the file."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {file_size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > file_size - 8:
            raise ValueError(
                f"{path}: corrupt or truncated safetensors file (header of {header_size} bytes, file of {file_size})"
            )
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed header entry for tensor {key!r}: {info!r}") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: unsupported dtype {dtype} for tensor {key!r}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: tensor {key!r} has byte range [{begin}, {end}) for {nbytes} bytes of data")
        if base + end > file_size:
            raise ValueError(
                f"{path}: truncated safetensors file (tensor {key!r} ends at byte {base + end}, file has {file_size})"
            )
        entries[key] = SafetensorsEntry(path, dtype, shape, base + begin, base + end)
    return entries


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def open_safetensors_file(path: Path) -> SafetensorsSource:
    """A single flat safetensors file; keys are exposed unchanged."""
    return SafetensorsSource(read_safetensors_header(path), f"safetensors file {path}", path=path)


def read_sharded_index(index_path: Path) -> tuple[dict[str, SafetensorsEntry], int]:
    """The entries of every tensor of an indexed, sharded safetensors checkpoint (shards beside the index), and the
    number of shards. Missing shards and tensors missing from their shard raise errors naming them."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no weight_map in the index")
    headers = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path}: shard {shard} is missing (expected at {shard_path})")
        headers[shard] = read_safetensors_header(shard_path)
    entries = {}
    for key, shard in weight_map.items():
        if key not in headers[shard]:
            raise ValueError(f"{index_path}: tensor {key!r} is mapped to {shard}, which does not contain it")
        entries[key] = headers[shard][key]
    return entries, len(headers)


def open_diffusers_folder(folder: Path) -> SafetensorsSource:
    """A diffusers model folder: `config.json` plus a single or sharded (indexed) `diffusion_pytorch_model`."""
    config_path = folder / "config.json"
    single, index_path = folder / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_INDEX
    if config_path.is_file() and not (single.is_file() or index_path.is_file()):
        config = read_json(config_path)
        kind = config.get("_class_name") or ", ".join(config.get("architectures") or []) or config.get("model_type")
        if kind:
            raise ValueError(f"{folder}: config.json describes {kind} and there are no diffusers weights "
                             f"({DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX}); expected a diffusers model folder")
    if not config_path.is_file() or not (single.is_file() or index_path.is_file()):
        raise ValueError(
            f"{folder}: expected a diffusers model folder (config.json + {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX}), "
            "a pipeline root with a transformer/ subfolder, a .safetensors file or a torch pickle (.pt/.pth/.bin)"
        )
    config = read_json(config_path)
    if single.is_file():
        return SafetensorsSource(read_safetensors_header(single), f"diffusers folder {folder} (1 file)", config, folder)
    entries, num_shards = read_sharded_index(index_path)
    return SafetensorsSource(entries, f"diffusers folder {folder} ({num_shards} shards)", config, folder)


def open_torch_pickle(path: Path) -> TorchStateDictSource:
    """A torch pickle, loaded with `weights_only=True`; the state dict is taken from "generator", "state_dict" or
    "model", else the top level. Wrapper names (`WRAPPER_NAMES`) are removed from the keys, then a prefix that every
    key has (`STRIPPED_PREFIXES`). A distillation save without its generator (only "critic") is refused."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading torch pickle checkpoints needs `pip install torch`") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: could not read torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict at the top level of the torch checkpoint, got {type(obj).__name__}")
    found = next((name for name in STATE_DICT_KEYS if name in obj), None)
    if found is None and "critic" in obj:
        raise ValueError(f"{path}: holds a distillation 'critic' (the fake-score model) but no 'generator'; only the "
                         "generator is a SANA-WM DiT to convert")
    if found is None:
        state = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
        origin = "top level"
    else:
        state = obj[found]
        origin = repr(found)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: {found!r} holds a {type(state).__name__}, not a state dict")
        not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
        if not_tensors:
            raise ValueError(f"{path}: {found!r} holds non-tensor entries {not_tensors[:5]}")
    if not state:
        raise ValueError(f"{path}: no tensors found in the torch checkpoint ({origin}; its entries: "
                         f"{sorted(map(str, obj))[:8]}); expected one of {list(STATE_DICT_KEYS)} or tensors")
    for key, value in state.items():
        if str(value.dtype).removeprefix("torch.") not in TORCH_DTYPE_NAMES:
            raise ValueError(f"{path}: unsupported dtype {value.dtype} for tensor {key!r}")
    description = f"torch checkpoint {path} ({origin}"
    unwrapped = {re.sub("|".join(map(re.escape, WRAPPER_NAMES)), "", key): value for key, value in state.items()}
    if len(unwrapped) != len(state):
        raise ValueError(f"{path}: keys collide once the wrapper names {WRAPPER_NAMES} are removed")
    if unwrapped.keys() != state.keys():
        state = unwrapped
        description += ", wrapper names removed"
    for prefix in STRIPPED_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
            description += f", prefix {prefix!r} stripped"
    return TorchStateDictSource(state, description + ")", path, tuple(sorted(map(str, obj))))


def open_torch_checkpoint(path: str | Path, *, subfolder: str | None = None) -> TensorSource:
    """Open a released PyTorch checkpoint lazily; see the module docstring for the recognised layouts.

    For a directory, `subfolder` selects a model folder inside a pipeline root; without it, a root that has no
    `config.json` but a `transformer/` subfolder opens that subfolder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        if subfolder is not None:
            path = path / subfolder
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: subfolder {subfolder!r} does not exist")
        elif not (path / "config.json").exists() and (path / "transformer").is_dir():
            path = path / "transformer"
        return open_diffusers_folder(path)
    if subfolder is not None:
        raise ValueError(f"{path}: subfolder={subfolder!r} only applies to a diffusers pipeline folder")
    if path.suffix == ".safetensors":
        return open_safetensors_file(path)
    if path.suffix in TORCH_SUFFIXES:
        return open_torch_pickle(path)
    raise ValueError(
        f"{path}: unrecognised checkpoint file; expected a .safetensors file, a torch pickle (.pt/.pth/.bin) "
        "or a diffusers model folder"
    )
