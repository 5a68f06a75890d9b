"""Multi-process runs: joining the processes, waiting for each other, and global batches from the examples each
process loaded.

    initialize("host0:1234", num_processes=2, process_id=0)   # before anything touches a device
    barrier("demo data built")                                  # every process waits until all get here
    batch = global_batch(local_batch, mesh)                     # process p holds rows [p*b, (p+1)*b) of the batch

Every process loads `b = global batch / process_count` examples (see `data.pipeline.make_dataset`); `global_batch`
makes them one array per input, laid out on the mesh by `shardings.batch_spec`. When that layout does not give each
process exactly its own rows (e.g. a batch of 2 replicated over fsdp=8), the rows are first placed one block per
process and then resharded by XLA.

Processes must enter a program with collectives at nearly the same time: on CPU, gloo gives the processes 30 s to set
up the communicator of their first collective. Work that only some processes do, or that may take one much longer
than another (building the demo data, compiling the train step), goes before a `barrier`, which waits through the
coordination service instead of a device collective. (For the same reason a run over several CPU processes does not
use the persistent compilation cache: see `cli.apply_compilation_cache_flags`.)
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sanawm_jax.parallel.shardings import batch_spec

PROCESS_AXES = ("process", "local")
BARRIER_TIMEOUT_S = 3600
_barrier_count = itertools.count()  # every process passes the same barriers in the same order


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`; CPU processes exchange collectives over gloo."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Block until every process has reached this barrier (at most `timeout_s`); nothing with one process."""
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=f"{name} #{next(_barrier_count)}", timeout_ms=timeout_s * 1000)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> set[tuple[int, int]]:
    """The (start, stop) batch-row ranges that this process's devices hold under `sharding`."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        start, stop, _ = index[0].indices(global_shape[0])
        rows.add((start, stop))
    return rows


def global_batch(local: dict, mesh: Mesh) -> dict:
    """{name: process-local array (b, ...)} -> {name: global jax.Array (b * process_count, ...)} sharded by
    `batch_spec` on `mesh`; process p's rows are rows [p*b, (p+1)*b)."""
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * count, *value.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(global_shape, mesh))
        if count == 1:
            out[name] = jax.device_put(value, sharding)
            continue
        own = (index * value.shape[0], (index + 1) * value.shape[0])
        held = process_rows(sharding, global_shape)
        if (min(start for start, _ in held), max(stop for _, stop in held)) == own:
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
            continue
        devices = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
        by_process = Mesh(np.array(devices).reshape(count, -1), PROCESS_AXES)
        placed = jax.make_array_from_process_local_data(
            NamedSharding(by_process, PartitionSpec(PROCESS_AXES[0])), value, global_shape
        )
        out[name] = jax.jit(lambda a: a, out_shardings=sharding)(placed)
    return out
