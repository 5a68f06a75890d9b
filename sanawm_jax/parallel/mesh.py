"""Device meshes over the axes ("data", "fsdp", "context", "tensor") and their `AXIS=N,...` spelling.

    mesh = make_mesh({"fsdp": 2, "context": 4})          # axes not named have size 1
    mesh = make_mesh(parse_mesh("fsdp=2,context=4"))      # the same, from a --mesh flag
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from sanawm_jax.parallel.axes import FSDP, MESH_AXES


def mesh_sizes(sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """{axis: size} over every mesh axis (unnamed axes 1); rejects unknown axes and sizes < 1."""
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
    bad = {axis: size for axis, size in sizes.items() if not isinstance(size, int) or size < 1}
    if bad:
        axis, size = next(iter(bad.items()))
        raise ValueError(f"mesh axis {axis} must have a positive integer size, got {size!r}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes MESH_AXES over `devices` (default: every device of every process). With no sizes, every
    device goes to `fsdp`. The product of the sizes must equal the device count."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(sizes if sizes else {FSDP: devices.size})
    needed = int(np.prod(list(sizes.values())))
    if needed != devices.size:
        raise ValueError(f"mesh {format_mesh(sizes)} needs {needed} devices, have {devices.size}")
    return Mesh(devices.reshape(tuple(sizes.values())), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=2,context=4" -> {"fsdp": 2, "context": 4}; a one-line ValueError names what is wrong."""
    sizes = {}
    for item in text.split(","):
        axis, sep, size = item.strip().partition("=")
        if not sep or not size.strip().isdigit():
            raise ValueError(f"mesh must be AXIS=N,... (e.g. fsdp=2,context=4), got {text!r}")
        if axis.strip() in sizes:
            raise ValueError(f"mesh axis {axis.strip()!r} is given twice in {text!r}")
        sizes[axis.strip()] = int(size)
    mesh_sizes(sizes)
    return sizes


def format_mesh(sizes: Mapping[str, int]) -> str:
    """{axis: size} -> "fsdp=2,context=4" (axes of size 1 left out; "data=1" for a one-device mesh)."""
    named = [f"{axis}={sizes[axis]}" for axis in MESH_AXES if sizes.get(axis, 1) > 1]
    return ",".join(named) or "data=1"
