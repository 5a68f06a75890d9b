"""Shardings of parameter trees and batches on a mesh from logical axes (see `rules`).

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    model, params = load_transformer("ckpt", sharding=param_shardings(abstract_params(config), mesh))
    batch = jax.device_put(batch, batch_shardings(batch, mesh))     # leading (batch) axis over data x fsdp
    with jax.set_mesh(mesh):                                          # activation constraints (`rules.constrain`)
        velocity = jax.jit(model.apply)({"params": params}, **batch)

Parameters stay plain pytrees: their logical axes come from PARAM_AXES, a table of path patterns. A parameter no
pattern names is split along its largest dimension that `fsdp` divides (FSDP), or replicated when small. The same
table shards optimiser state, whose leaves repeat the parameter paths. XLA inserts the all-gathers and
reduce-scatters.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sanawm_jax.parallel.axes import FSDP
from sanawm_jax.parallel.rules import logical_to_spec

# (pattern searched in the "/"-joined path, logical axes of the leading dimensions). The fused projections
# (qkv, the FFN's inverted conv and its depthwise conv) are split over fsdp only: the model regroups their output
# columns per head / hidden channel before splitting them over "tensor" (see `layers.GroupedDense`).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/qkv/kernel$", ("embed", None)),
    (r"attn/(q|k|v)_proj_cam/kernel$", ("embed", "heads")),
    (r"attn/(q|k|v)_proj_cam/bias$", ("heads",)),
    (r"attn/output_gate/kernel$", ("embed", "heads")),
    (r"attn/output_gate/bias$", ("heads",)),
    (r"attn/(proj|out_proj_cam)/kernel$", ("heads", "embed")),
    (r"cross_attn/q_linear/kernel$", ("embed", "heads")),
    (r"cross_attn/q_linear/bias$", ("heads",)),
    (r"cross_attn/kv_linear/kernel$", ("embed", None)),
    (r"cross_attn/proj/kernel$", ("heads", "embed")),
    (r"mlp/inverted_conv/kernel$", (None, None, "embed", None)),
    (r"mlp/depth_conv/kernel$", (None, None, None, None)),
    (r"mlp/point_conv/kernel$", (None, None, "mlp", "embed")),
    (r"mlp/t_conv/kernel$", (None, None, "embed", None)),
    # The refiner (LTX-2) transformer and its text connectors: per-head projections, GELU MLP.
    (r"attn[12]/to_(q|k|v)/kernel$", ("embed", "heads")),
    (r"attn[12]/to_(q|k|v)/bias$", ("heads",)),
    (r"attn[12]/to_out_0/kernel$", ("heads", "embed")),
    (r"ff/net_0/proj/kernel$", ("embed", "mlp")),
    (r"ff/net_0/proj/bias$", ("mlp",)),
    (r"ff/net_2/kernel$", ("mlp", "embed")),
)
MIN_SPLIT_SIZE = 2**14


def path_string(path) -> str:
    """A tree path as "blocks_0/attn/qkv/kernel" (dict keys, attribute names and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def param_logical_axes(path: str) -> tuple[str | None, ...] | None:
    """The logical axes PARAM_AXES gives the parameter at `path`, or None."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            return axes
    return None


def fsdp_partition(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_SPLIT_SIZE) -> PartitionSpec:
    """Split the largest dimension divisible by `fsdp_size` over the fsdp axis; replicate small or indivisible
    arrays."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*([None] * axis + [FSDP]))


def fsdp_shardings(tree, mesh: Mesh, min_size: int = MIN_SPLIT_SIZE):
    """FSDP-only NamedShardings (`fsdp_partition` of every leaf), for models without a PARAM_AXES table."""
    fsdp_size = dict(mesh.shape).get(FSDP, 1)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_partition(tuple(leaf.shape), fsdp_size, min_size)), tree)


def param_spec(path: str, shape: tuple[int, ...], mesh_shape: dict[str, int],
               min_size: int = MIN_SPLIT_SIZE) -> PartitionSpec:
    """The PartitionSpec of one parameter (or optimiser-state leaf) from its path and shape."""
    axes = param_logical_axes(path)
    if axes is None or len(axes) != len(shape):
        return fsdp_partition(shape, mesh_shape.get(FSDP, 1), min_size)
    return logical_to_spec(axes, shape, mesh_shape)


def param_shardings(tree, mesh: Mesh, min_size: int = MIN_SPLIT_SIZE):
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (e.g. `abstract_params(config)` or an optimiser
    state)."""
    mesh_shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path_string(path), tuple(leaf.shape), mesh_shape, min_size)),
        tree,
    )


def batch_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Leading (batch) axis over ("data", "fsdp") as far as the batch size allows; other axes not split."""
    return logical_to_spec(("batch",), shape, dict(mesh.shape))


def batch_shardings(batch, mesh: Mesh):
    """NamedShardings for a tree of batch arrays (leading axis = batch)."""
    return jax.tree.map(lambda leaf: NamedSharding(mesh, batch_spec(tuple(np.shape(leaf)), mesh)), batch)
