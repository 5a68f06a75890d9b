"""The conversion core every model's checkpoint map uses: PyTorch layouts -> Flax layouts, flat <-> nested
parameter trees, and one strict mismatch report.

Layout: Linear (out, in) -> (in, out); ConvNd (out, in, *k) -> (*k, in, out); every other tensor keeps its layout.
Naming: a model's map turns each Flax parameter path into the source key it is read from (`torch_name` does the part
all models share). Conversion is strict: every source key is a parameter or known-unused, every parameter is filled,
every shape matches, and all of it is checked from the headers before any tensor is read.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable

import jax
import numpy as np

TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def flax_axes(ndim: int, leaf: str) -> tuple[int, ...]:
    """The transpose taking a PyTorch tensor of `ndim` dims to the Flax layout of a parameter named `leaf`."""
    if leaf != "kernel" or ndim < 2:
        return tuple(range(ndim))
    if ndim == 2:
        return (1, 0)
    return (*range(2, ndim), 1, 0)


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    return array.transpose(flax_axes(array.ndim, leaf))


def flax_shape(torch_shape: Iterable[int], leaf: str) -> tuple[int, ...]:
    torch_shape = tuple(torch_shape)
    return tuple(torch_shape[axis] for axis in flax_axes(len(torch_shape), leaf))


def torch_shape(flax_shape: Iterable[int], leaf: str) -> tuple[int, ...]:
    """Inverse of `flax_shape`: the PyTorch shape of the tensor a Flax parameter is read from."""
    flax_shape = tuple(flax_shape)
    shape = [0] * len(flax_shape)
    for position, axis in enumerate(flax_axes(len(flax_shape), leaf)):
        shape[axis] = flax_shape[position]
    return tuple(shape)


def torch_name(path: tuple[str, ...], numbered: str = r"\w+?") -> str:
    """("blocks_3", "attn", "qkv", "kernel") -> "blocks.3.attn.qkv.weight".

    Flax leaves `kernel`/`scale`/`embedding` become `weight`; list entries `<name>_<i>` become `<name>.<i>` for the
    names matching the regex `numbered` (every name by default).
    """
    *parents, leaf = path
    parts = [re.sub(rf"^({numbered})_(\d+)$", r"\1.\2", part) for part in parents]
    return ".".join([*parts, TORCH_LEAF_NAMES.get(leaf, leaf)])


def flatten(tree: dict) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def summarize_keys(keys: Iterable[str]) -> str:
    """"pos_embed, blocks.N.attn.recall_gate (x20)": keys that differ only in their list indices are counted once."""
    groups = collections.Counter(re.sub(r"(?<=\.)\d+(?=\.)", "N", key) for key in keys)
    return ", ".join(name if count == 1 else f"{name} (x{count})" for name, count in sorted(groups.items()))


class ConversionError(ValueError):
    """A source checkpoint that does not match the model. The first line of the message sums the problems up and
    names the first offending key; the lines after it list every offending key."""


def raise_on_mismatch(source: str, target: str, missing, extra, mismatched):
    """Raise one ConversionError naming every missing, unexpected and mis-shaped key, if there is any."""
    problems = [
        ("missing key(s)", "missing", missing),
        ("unexpected key(s)", "unexpected", extra),
        ("shape mismatch(es)", "mis-shaped", mismatched),
    ]
    found = [(title, kind, items) for title, kind, items in problems if items]
    if not found:
        return
    counts = ", ".join(f"{len(items)} {title}" for title, _, items in found)
    _, first_kind, first_items = found[0]
    lines = [f"{source} does not match {target}: {counts}; first {first_kind}: {first_items[0]}"]
    for title, _, items in found:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items)
    raise ConversionError("\n".join(lines))


def plan_conversion(source, expected: dict, to_key: Callable[[tuple[str, ...]], str], target: str,
                    is_unused: Callable[[str], bool] = lambda key: False, log=print) -> dict[str, tuple[str, ...]]:
    """Check a `TensorSource` against the parameter slots `expected` ({path: ShapeDtypeStruct}) from its headers
    alone -> {source key: slot path}.

    `to_key(path)` names the source key a slot is read from; source keys that are no slot's must satisfy `is_unused`
    (they are skipped and listed in one log line). Any missing, unexpected or mis-shaped key raises one
    ConversionError naming all of them.
    """
    wanted = {to_key(path): path for path in expected}
    present = set(source.keys())
    missing = [f"{key} (for {'/'.join(path)})" for key, path in wanted.items() if key not in present]
    unused = sorted(key for key in present - set(wanted) if is_unused(key))
    extra = sorted(present - set(wanted) - set(unused))
    mismatched = []
    for key, path in wanted.items():
        if key not in present:
            continue
        shape = tuple(source.shape(key))
        model_shape = tuple(expected[path].shape)
        if flax_shape(shape, path[-1]) != model_shape:
            mismatched.append(
                f"{key}: source {shape} -> {flax_shape(shape, path[-1])}, model {'/'.join(path)} expects {model_shape}"
            )
    raise_on_mismatch(f"checkpoint {getattr(source, 'description', source)}", target, missing, extra, mismatched)
    if unused:
        log(f"not converted ({len(unused)} tensor(s) the model does not use): {summarize_keys(unused)}")
    return wanted


def convert_tensors(source, expected: dict, to_key: Callable[[tuple[str, ...]], str], target: str,
                    is_unused: Callable[[str], bool] = lambda key: False, log=print) -> dict:
    """`plan_conversion`, then every tensor read one at a time into the nested params tree of numpy arrays."""
    wanted = plan_conversion(source, expected, to_key, target, is_unused, log)
    return unflatten({path: _read(source, key, path, expected[path]) for key, path in wanted.items()})


def convert_tensor_groups(source, expected: dict, to_key: Callable[[tuple[str, ...]], str], target: str,
                          is_unused: Callable[[str], bool] = lambda key: False, log=print):
    """`plan_conversion`, then yield one flat {path: numpy array} per source file (`source.location`), so no more
    than one shard's tensors are held at a time."""
    wanted = plan_conversion(source, expected, to_key, target, is_unused, log)
    groups = collections.defaultdict(list)
    for key in sorted(wanted):
        groups[source.location(key)].append(key)
    for location in sorted(groups):
        yield {wanted[key]: _read(source, key, wanted[key], expected[wanted[key]]) for key in groups[location]}


def _read(source, key: str, path: tuple[str, ...], slot) -> np.ndarray:
    """One source tensor laid out for Flax (`to_flax_layout`) and cast to its slot's dtype."""
    return np.ascontiguousarray(to_flax_layout(source.load(key), path[-1]), dtype=slot.dtype)
