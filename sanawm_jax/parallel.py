"""Device meshes and shardings for data-parallel + FSDP execution with `jax.jit` (pjit).

    mesh = make_mesh(fsdp=8)                                   # ("data", "fsdp") over all devices
    model, params = load_transformer("ckpt", sharding=fsdp_shardings(abstract_params(config), mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))        # leading (batch) axis over data x fsdp
    velocity = jax.jit(model.apply)({"params": params}, **batch)

Each large parameter is split along its largest dimension that the `fsdp` axis divides, and replicated over `data`;
XLA inserts the all-gathers and reduce-scatters. Small parameters (norm scales, biases) stay replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh; -1 for `data` takes every device not used by `fsdp`."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if data == -1:
        if devices.size % fsdp:
            raise ValueError(f"{devices.size} devices cannot be split into fsdp groups of {fsdp}")
        data = devices.size // fsdp
    if data * fsdp != devices.size:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {devices.size}")
    return Mesh(devices.reshape(data, fsdp), (DATA, FSDP))


def fsdp_partition(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Split the largest dimension divisible by `fsdp_size` over the fsdp axis; replicate small or indivisible
    arrays."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*([None] * axis + [FSDP]))


def fsdp_shardings(tree, mesh: Mesh, min_size: int = 2**14):
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (e.g. `abstract_params(config)`)."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_partition(leaf.shape, fsdp_size, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs split along their leading (batch) axis over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))
