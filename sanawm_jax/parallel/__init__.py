"""Device meshes, logical-axis sharding rules, and parameter / batch / activation shardings.

    from sanawm_jax.parallel import make_mesh, param_shardings, batch_shardings
    mesh = make_mesh({"fsdp": 2, "context": 2, "tensor": 2})

Modules: `axes` (mesh axis names), `mesh` (construction and the `AXIS=N,...` spelling), `rules` (logical axis names
-> mesh axes, `constrain`), `shardings` (parameters by path pattern, batches), `distributed` (multi-process set-up and
process-local batches).
"""

from sanawm_jax.parallel.axes import CONTEXT, DATA, FSDP, MESH_AXES, TENSOR
from sanawm_jax.parallel.mesh import format_mesh, make_mesh, mesh_sizes, parse_mesh
from sanawm_jax.parallel.rules import LOGICAL_AXIS_RULES, UNCONSTRAINED, axis_rules, constrain, logical_to_spec
from sanawm_jax.parallel.shardings import (
    PARAM_AXES,
    batch_shardings,
    batch_spec,
    fsdp_partition,
    fsdp_shardings,
    param_shardings,
)

__all__ = [
    "CONTEXT",
    "DATA",
    "FSDP",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "PARAM_AXES",
    "TENSOR",
    "UNCONSTRAINED",
    "axis_rules",
    "batch_shardings",
    "batch_spec",
    "constrain",
    "format_mesh",
    "fsdp_partition",
    "fsdp_shardings",
    "logical_to_spec",
    "make_mesh",
    "mesh_sizes",
    "param_shardings",
    "parse_mesh",
]
