"""The conversion core every model's checkpoint map uses: PyTorch layouts -> Flax layouts, flat <-> nested
parameter trees, and one strict mismatch report.

Layout: Linear (out, in) -> (in, out); ConvNd (out, in, *k) -> (*k, in, out).
Conversion is strict: every source tensor is used or known-unused, every parameter is filled, every shape matches.
"""

from __future__ import annotations

import jax
import numpy as np


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        return array.T
    return array.transpose(*range(2, array.ndim), 1, 0)


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


class ConversionError(ValueError):
    """A source checkpoint that does not match the model; the message lists every offending key."""


def raise_on_mismatch(source: str, target: str, missing, extra, mismatched):
    """Raise one ConversionError listing every missing, unexpected and mis-shaped key, if there is any."""
    problems = [
        (f"{len(missing)} missing key(s)", missing),
        (f"{len(extra)} unexpected key(s)", extra),
        (f"{len(mismatched)} shape mismatch(es)", mismatched),
    ]
    if not any(items for _, items in problems):
        return
    lines = [f"{source} does not match {target}:"]
    for title, items in problems:
        if items:
            lines.append(f"  {title}:")
            lines.extend(f"    {item}" for item in items)
    raise ConversionError("\n".join(lines))


def convert_tensors(source, expected: dict, to_path, to_key, target: str, is_unused=lambda key: False,
                    log=print) -> dict:
    """Read every tensor of a `TensorSource` into the parameter slots `expected` ({path: ShapeDtypeStruct}).

    `to_path(key, ndim)` names the slot of a source key and `to_key(path)` the key a slot is read from; tensors are
    loaded one at a time, laid out for Flax (`to_flax_layout`) and cast to the slot's dtype. Any missing, unexpected
    or mis-shaped key raises one ConversionError that lists them all; `is_unused` keys are skipped (and logged).
    """
    params: dict[tuple[str, ...], np.ndarray] = {}
    unused, extra, mismatched = [], [], []
    for key in source.keys():
        if is_unused(key):
            unused.append(key)
            continue
        shape = tuple(source.shape(key))
        path = to_path(key, len(shape))
        if path not in expected:
            extra.append(key)
            continue
        flax_shape = tuple(to_flax_layout(np.empty(shape, np.bool_), path[-1]).shape)
        if flax_shape != tuple(expected[path].shape):
            mismatched.append(
                f"{key}: source {shape} -> {flax_shape}, model {'/'.join(path)} expects {tuple(expected[path].shape)}"
            )
            continue
        params[path] = np.ascontiguousarray(to_flax_layout(source.load(key), path[-1])).astype(expected[path].dtype)
    missing = [f"{to_key(path)} (for {'/'.join(path)})" for path in expected if path not in params]
    raise_on_mismatch(f"checkpoint {getattr(source, 'description', source)}", target, missing, extra, mismatched)
    if unused:
        log(f"ignored {len(unused)} known-unused tensor(s): {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
    return unflatten(params)
