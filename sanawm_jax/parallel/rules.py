"""Logical axes: arrays are annotated with logical axis names, and a rules table maps each name to mesh axes, in the
style of maxtext/maxdiffusion logical axis rules. A different parallel layout is a different table, not different
model code:

    with axis_rules({**LOGICAL_AXIS_RULES, "mlp": ()}):   # e.g. MLP weights not split over "tensor"
        ...

`UNCONSTRAINED` in place of a name leaves that dimension to XLA (`constrain` only); None means not split.

A name maps to a tuple of mesh axes tried in order. An axis is used when it has size > 1, is not already used by
another dimension of the same array, is not a manual (shard_map) axis, and the dimension's size stays divisible by the
product of the axes taken: a batch of 2 on data=2, fsdp=4 is split over "data" only, a batch of 1 is not split.

Activation names: batch, frames, tokens (positions inside one frame), sequence (frames x tokens flattened),
act_embed, act_heads, act_kv (head dim), act_mlp, text (caption positions). Parameter names: embed, heads, kv, mlp
(see `shardings.PARAM_AXES` for which parameter takes which).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from sanawm_jax.parallel.axes import CONTEXT, DATA, FSDP, TENSOR

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": (DATA, FSDP),
    "frames": (CONTEXT,),
    "sequence": (CONTEXT,),
    "tokens": (),
    "text": (),
    "act_embed": (),
    "act_heads": (TENSOR,),
    "act_kv": (),
    "act_mlp": (TENSOR,),
    # parameters
    "embed": (FSDP,),
    "heads": (TENSOR,),
    "kv": (),
    "mlp": (TENSOR,),
}

_RULES = contextvars.ContextVar("sanawm_jax_axis_rules", default=LOGICAL_AXIS_RULES)

UNCONSTRAINED = PartitionSpec.UNCONSTRAINED
LogicalAxes = Sequence[str | None]


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, Sequence[str]]):
    """Use `rules` ({logical name: mesh axes}) instead of LOGICAL_AXIS_RULES inside the block (at trace time)."""
    token = _RULES.set({name: tuple(axes) for name, axes in rules.items()})
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> dict[str, tuple[str, ...]]:
    return _RULES.get()


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int], mesh_shape: Mapping[str, int],
                    excluded: Sequence[str] = ()) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose leading dimensions carry `logical_axes` (None: not split; the
    dimensions beyond them are not split), on a mesh of `mesh_shape` ({axis: size}), never using `excluded` axes."""
    if len(logical_axes) > len(shape):
        raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape {tuple(shape)}")
    rules = current_rules()
    used = set(excluded)
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None or name is UNCONSTRAINED:
            spec.append(name)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(sorted(rules))}")
        chosen, product = [], 1
        for axis in rules[name]:
            count = mesh_shape.get(axis, 1)
            if count > 1 and axis not in used and size % (product * count) == 0:
                chosen.append(axis)
                product *= count
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else chosen[0] if chosen else None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`x` with a sharding constraint from its logical axes on the current mesh (`jax.set_mesh`); unchanged when no
    mesh is set. Inside shard_map the manual axes are left alone."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape), excluded=mesh.manual_axes)
    if all(axis is None for axis in spec) and mesh.manual_axes:
        return x
    return jax.lax.with_sharding_constraint(x, spec)
