"""Context parallelism: the latent frames of a clip sharded over the "context" mesh axis, with exact results.

A model run under `jax.set_mesh(mesh)` whose "context" axis has c > 1 devices pads its T frames to T_pad, a multiple
of c (`ContextLayout`), so that device i holds frames [i·T_l, (i+1)·T_l), T_l = T_pad / c. Per-token work needs no
communication; every layer that mixes frames runs here in `jax.shard_map` over the context axis (the other mesh axes
stay automatic). Padded frames never reach a real frame: their keys are masked out of softmax attention, they get
β = 0 and decay 1 in the GDN (they neither write nor erase state), and temporal convolutions read them as zeros.

    softmax attention  "allgather": every device's queries against all keys/values (all-gather of K/V);
                       "ring": K/V blocks passed around the ring (ppermute) with an online softmax, so a device
                       holds one remote block at a time (the memory-lean variant);
                       "ulysses": all-to-all from frame shards to head shards, full-sequence attention on H/c heads,
                       and back (when c divides the head count; otherwise "allgather").
    cross-attention    `local_attention_cp`: each device's queries against the caption keys/values every device
                       holds; no exchange (left to the automatic partitioner, the query blocks of the XLA path cut
                       across the frame shards and every device gathers and attends every query).
    frame-level GDN    "allgather"/"ring": state passing. The recurrence is affine in its state
                       (M_out = M_in·A + B, A and B from the device's own frames), so each device computes (A, B)
                       for both scan directions, all-gathers these small D×D matrices, chains them into the state its
                       left (forward scan) and right (backward scan) neighbours hand on, and runs its frames from
                       there: O(T_l) work per device, no frames exchanged.
                       "ulysses": all-to-all to head shards, the whole sequence per head, and back.
    temporal convs     halos: `frame_blocks` gives each device its frames plus `reach` neighbouring frames on each
                       side (ppermute), laid out as a (c·B)-row batch the unchanged conv modules run on; `unblock`
                       crops the halos and returns to the frame-sharded layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from sanawm_jax.ops.attention import MASKED_LOGIT, dot_product_attention, query_blocking
from sanawm_jax.ops.gdn import GDNState, ScanState
from sanawm_jax.parallel.axes import CONTEXT

CONTEXT_IMPLS = ("allgather", "ring", "ulysses")
HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ContextLayout:
    """Static layout of T frames over `size` devices of mesh axis `axis` (padded to `padded_frames`)."""

    size: int
    frames: int
    impl: str = "allgather"
    axis: str = CONTEXT

    @property
    def padded_frames(self) -> int:
        return -(-self.frames // self.size) * self.size

    @property
    def local_frames(self) -> int:
        return self.padded_frames // self.size

    def valid_frames(self) -> np.ndarray:
        """(T_pad,) bool: the real frames."""
        return np.arange(self.padded_frames) < self.frames

    def block_frame_index(self, reach: int, batch: int) -> np.ndarray:
        """(c·B, T_l + 2·reach) int: the global frame each position of `frame_blocks`' output holds (may be < 0 or
        >= T_pad at the ends of the clip)."""
        local = np.arange(-reach, self.local_frames + reach)
        index = np.arange(self.size)[:, None] * self.local_frames + local[None, :]
        return np.repeat(index, batch, axis=0)

    def pad(self, x, mode: str = "constant"):
        """(B, T, ...) -> (B, T_pad, ...): zeros, or copies of the last frame with mode="edge"."""
        widths = [(0, 0), (0, self.padded_frames - self.frames)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, mode=mode)

    def device_index(self):
        """(c,) int32: 0..c-1, passed into `shard_map` split over the axis so each device reads its own index (see
        `_own_index`)."""
        return jnp.arange(self.size, dtype=jnp.int32)

    def shard_map(self, fn, in_specs, out_specs):
        """`fn` mapped over this layout's axis only (every other mesh axis stays automatic). The ops run inside
        (scans, kernels) are not written for varying-manual-axes typing, so that check is off."""
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names={self.axis}, check_vma=False)


def context_layout(num_frames: int, impl: str = "allgather", axis: str = CONTEXT) -> ContextLayout | None:
    """The layout for the current mesh (`jax.set_mesh`), or None without a mesh or with a context axis of size 1."""
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"context_impl must be one of {CONTEXT_IMPLS}, got {impl!r}")
    mesh = jax.sharding.get_abstract_mesh()
    size = 1 if mesh.empty else dict(mesh.shape).get(axis, 1)
    return ContextLayout(size, num_frames, impl, axis) if size > 1 else None


def _frames_spec(ndim: int, frame_axis: int = 1) -> P:
    return P(*([None] * frame_axis + [CONTEXT] + [None] * (ndim - frame_axis - 1)))


def _spec(layout, spec: P) -> P:
    return P(*(layout.axis if name == CONTEXT else name for name in spec))


def _own_index(device_index):
    """Inside shard_map: this device's index along the context axis, from its (1,) block of
    `ContextLayout.device_index()`. Not `lax.axis_index`: in a shard_map whose other mesh axes stay automatic, JAX
    lowers it to a partition id in a nested, operand-less manual region, which XLA's SPMD partitioner rejects once a
    program holds a few blocks of these ops ("PartitionId instruction is not supported for SPMD partitioning")."""
    return device_index[0]


def _local_valid(layout, device_index):
    """Inside shard_map: (T_l,) bool, the real frames among this device's."""
    return _own_index(device_index) * layout.local_frames + jnp.arange(layout.local_frames) < layout.frames


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_tokens(x, axis_name: str):
    """Inside shard_map: (B, N_l, ...) -> (B, c·N_l, ...), every device's block along axis 1 in device order. The
    gradient (a sum over the devices, scattered back) is summed in float32 whatever x's dtype: the reduce-scatter JAX
    writes for the transpose of a bf16 all-gather aborts XLA's CPU compiler (its all-reduce promotion cannot clone
    that reduction), and a sum over devices belongs in float32 anyway."""
    return lax.all_gather(x, axis_name, axis=1, tiled=True)


def _gather_tokens_fwd(x, axis_name):
    return _gather_tokens(x, axis_name), None


def _gather_tokens_bwd(axis_name, _, cotangent):
    summed = lax.psum_scatter(cotangent.astype(jnp.float32), axis_name, scatter_dimension=1, tiled=True)
    return (summed.astype(cotangent.dtype),)


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def _shift(layout, x, hops: int):
    """Inside shard_map: device i receives x of device i - hops (zeros where that device does not exist)."""
    if hops > 0:
        perm = [(j, j + hops) for j in range(layout.size - hops)]
    else:
        perm = [(j - hops, j) for j in range(layout.size + hops)]
    return lax.ppermute(x, layout.axis, perm)


# ---------------------------------------------------------------------------------------------------------- halos


def frame_blocks(layout: ContextLayout, x, reach: int):
    """(B, T_pad, ...) frame-sharded -> (c·B, T_l + 2·reach, ...): row block i holds device i's frames with `reach`
    frames of its neighbours on each side; padded frames and frames beyond the clip are zeros. Rows are sharded
    over the context axis, so per-frame modules (convolutions with "same" padding) run on it unchanged; their outputs
    at positions [reach, reach + T_l) are exact (`unblock`)."""
    hops = min(-(-reach // layout.local_frames), layout.size - 1)  # devices a halo reaches into on each side

    def local(x, device_index):
        x = x * _local_valid(layout, device_index).astype(x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))
        if not reach:
            return x
        zeros = jnp.zeros((x.shape[0], reach) + x.shape[2:], x.dtype)  # beyond the clip (a halo wider than it)
        # Hop h sends only the frames the halo takes from it: all T_l but for the farthest device.
        width = lambda h: min(reach - (h - 1) * layout.local_frames, layout.local_frames)
        left = [_shift(layout, x[:, x.shape[1] - width(h):], h) for h in range(hops, 0, -1)]
        right = [_shift(layout, x[:, : width(h)], -h) for h in range(1, hops + 1)]
        left = jnp.concatenate([zeros] + left, axis=1)[:, -reach:]
        right = jnp.concatenate(right + [zeros], axis=1)[:, :reach]
        return jnp.concatenate([left, x, right], axis=1)

    in_specs = (_spec(layout, _frames_spec(x.ndim)), _spec(layout, P(CONTEXT)))
    return layout.shard_map(local, in_specs, _spec(layout, P(CONTEXT)))(x, layout.device_index())


def unblock(layout: ContextLayout, blocks, reach: int):
    """Inverse of `frame_blocks`: (c·B, T_l + 2·reach, ...) -> (B, T_pad, ...) frame-sharded, halos dropped."""
    local = lambda y: y[:, reach : reach + layout.local_frames]
    return layout.shard_map(local, _spec(layout, P(CONTEXT)), _spec(layout, _frames_spec(blocks.ndim)))(blocks)


# ----------------------------------------------------------------------------------------------- softmax attention


def dot_product_attention_cp(layout: ContextLayout, query, key, value, *, scale: float, key_mask=None,
                             impl: str = "xla", segments=None):
    """`ops.attention.dot_product_attention` on token-sharded (B, N_pad, H, D) inputs, N_pad = T_pad·S (frames
    major). Keys of padded frames are masked out (key_mask (B or 1, 1, 1, N_pad) and segments as in the
    single-device op, for the padded length). Returns (B, N_pad, H, D) token-sharded."""
    b, n, h, d = query.shape
    tokens = n // layout.padded_frames
    valid = np.repeat(layout.valid_frames(), tokens)[None, None, None, :]
    key_mask = jnp.asarray(valid) if key_mask is None else key_mask & valid
    query_segments = key_segments = None
    if segments is not None:
        query_segments, key_segments = (jnp.asarray(s, jnp.int32) for s in segments)
    heads_divide = h % layout.size == 0
    if layout.impl == "ulysses" and heads_divide:
        fn = functools.partial(_ulysses_attention, layout, scale=scale, impl=impl)
    elif layout.impl == "ring":
        fn = functools.partial(_ring_attention, layout, scale=scale)
    else:
        fn = functools.partial(_allgather_attention, layout, scale=scale, impl=impl)
    tokens_spec = _spec(layout, P(None, CONTEXT))
    segment_specs = (None, None) if segments is None else (_spec(layout, P(CONTEXT)), P())
    in_specs = (tokens_spec,) * 3 + (P(),) + segment_specs
    operands = (query, key, value, key_mask, query_segments, key_segments)
    if fn.func is _ring_attention:
        in_specs, operands = in_specs + (_spec(layout, P(CONTEXT)),), operands + (layout.device_index(),)
    return layout.shard_map(fn, in_specs, tokens_spec)(*operands)


def local_attention_cp(layout: ContextLayout, query, key, value, *, scale: float, key_mask=None, impl: str = "xla"):
    """`ops.attention.dot_product_attention` of token-sharded queries (B, N_pad, H, D) against keys/values (B, L, H, D)
    and key_mask (B or 1, 1, 1, L) that every device holds whole (cross-attention to the caption). Returns
    (B, N_pad, H, D) token-sharded.

    Keys and values enter the shard_map in float32 (a lossless round trip from bf16): the gradient of an input every
    device holds is a sum over the devices, kept in float32 (see `_gather_tokens`)."""
    dtype = key.dtype
    attend = lambda q, k, v, mask: dot_product_attention(q, k.astype(dtype), v.astype(dtype), scale=scale,
                                                         key_mask=mask, impl=impl)
    tokens_spec = _spec(layout, P(None, CONTEXT))
    return layout.shard_map(attend, (tokens_spec, P(), P(), P()), tokens_spec)(
        query, key.astype(jnp.float32), value.astype(jnp.float32), key_mask)


def _allgather_attention(layout, query, key, value, key_mask, query_segments, key_segments, *, scale, impl):
    gather = lambda a: _gather_tokens(a, layout.axis)
    segments = None if query_segments is None else (query_segments, key_segments)
    return dot_product_attention(query, gather(key), gather(value), scale=scale, key_mask=key_mask, impl=impl,
                                 segments=segments)


def _ulysses_attention(layout, query, key, value, key_mask, query_segments, key_segments, *, scale, impl):
    to_heads = lambda a: lax.all_to_all(a, layout.axis, split_axis=2, concat_axis=1, tiled=True)
    segments = None
    if query_segments is not None:
        segments = (lax.all_gather(query_segments, layout.axis, tiled=True), key_segments)
    out = dot_product_attention(to_heads(query), to_heads(key), to_heads(value), scale=scale, key_mask=key_mask,
                                impl=impl, segments=segments)
    return lax.all_to_all(out, layout.axis, split_axis=1, concat_axis=2, tiled=True)


def _ring_attention(layout, query, key, value, key_mask, query_segments, key_segments, device_index, *, scale):
    """Online softmax over the c key/value blocks, the block of device i - s at ring step s (float32 statistics);
    queries in blocks as the XLA path (`ops.attention.query_blocking`, for one device's keys)."""
    b, nq, h, d = query.shape
    index = _own_index(device_index)
    query_heads = jnp.swapaxes(query, 1, 2)  # (B, H, Nq, D)
    num_blocks, block = query_blocking(b, h, nq, key.shape[1])
    pad = num_blocks * block - nq
    query_blocks = jnp.pad(query_heads, ((0, 0), (0, 0), (0, pad), (0, 0)))
    query_blocks = jnp.moveaxis(query_blocks.reshape(b, h, num_blocks, block, d), 2, 0)
    segment_blocks = None
    if query_segments is not None:
        segment_blocks = jnp.pad(query_segments, (0, pad), mode="edge").reshape(num_blocks, block)
    key_mask = jnp.broadcast_to(key_mask, (key_mask.shape[0], 1, 1, key_mask.shape[-1]))

    def attend_block(carry, key_block, value_block, source):
        """Fold the keys/values of device `source` into every query block's (max, sum, output)."""
        nk = key_block.shape[1]
        keys = jnp.swapaxes(key_block, 1, 2)
        values = jnp.swapaxes(value_block, 1, 2)
        mask = lax.dynamic_slice_in_dim(key_mask, source * nk, nk, axis=3)
        key_ids = None if key_segments is None else lax.dynamic_slice_in_dim(key_segments, source * nk, nk)

        def fold(args):
            (row_max, row_sum, out), rows, row_ids = args
            logits = jnp.einsum("bhqd,bhkd->bhqk", rows, keys, preferred_element_type=jnp.float32) * scale
            logits = jnp.where(mask, logits, MASKED_LOGIT)
            if row_ids is not None:
                logits = jnp.where(key_ids[None, :] <= row_ids[:, None], logits, MASKED_LOGIT)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1, keepdims=True))
            weights = jnp.exp(logits - new_max)
            rescale = jnp.exp(row_max - new_max)
            out = out * rescale + jnp.einsum("bhqk,bhkd->bhqd", weights.astype(values.dtype), values,
                                             preferred_element_type=jnp.float32)
            return new_max, row_sum * rescale + jnp.sum(weights, axis=-1, keepdims=True), out

        # As in `ops.attention`: gradients recompute each block's logits instead of saving them for every block.
        return lax.map(jax.checkpoint(fold, prevent_cse=False), (carry, query_blocks, segment_blocks))

    stats = (jnp.full((num_blocks, b, h, block, 1), -jnp.inf, jnp.float32),
             jnp.zeros((num_blocks, b, h, block, 1), jnp.float32),
             jnp.zeros((num_blocks, b, h, block, value.shape[-1]), jnp.float32))
    for step in range(layout.size):
        if step:
            key, value = _rotate(layout, key), _rotate(layout, value)
        stats = attend_block(stats, key, value, (index - step) % layout.size)
    _, row_sum, out = stats
    out = (out / row_sum).astype(value.dtype)  # (num_blocks, B, H, block, D)
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, num_blocks * block, -1)[:, :, :nq]
    return jnp.swapaxes(out, 1, 2)


def _rotate(layout, x):
    """Inside shard_map: device i receives x of device i - 1, device 0 that of device c - 1."""
    return lax.ppermute(x, layout.axis, [(j, (j + 1) % layout.size) for j in range(layout.size)])


# ------------------------------------------------------------------------------------------------- frame-level GDN


def frame_gdn_cp(layout: ContextLayout, op, q_rot, k_rot, v, beta, decay, q=None, k=None, *, eps=1e-8,
                 chunk_starts=None):
    """`op` (`ops.gdn.frame_gdn` or the Pallas kernel: same signature and state contract) on frame-sharded inputs
    q_rot, k_rot, v, q, k (B, T_pad, S, H, D), beta (B, T_pad, S, H), decay (B, T_pad, H); chunk_starts (T_pad,)
    bool or None. Padded frames get β = 0 and decay 1. Returns (B, T_pad, S, H, D) frame-sharded."""
    has_starts = chunk_starts is not None
    starts = jnp.asarray(chunk_starts if has_starts else np.zeros(layout.padded_frames, bool))
    denominator = () if q is None else (q, k)
    if layout.impl == "ulysses" and v.shape[3] % layout.size == 0:
        fn = _ulysses_gdn
    else:
        fn = _state_passing_gdn
    fn = functools.partial(fn, layout, op, eps, has_starts)
    frames = lambda a: _spec(layout, _frames_spec(a.ndim))
    arrays = (q_rot, k_rot, v, beta, decay, starts, layout.device_index()) + denominator
    in_specs = tuple(frames(a) if a.ndim > 1 else _spec(layout, P(CONTEXT)) for a in arrays)
    return layout.shard_map(fn, in_specs, frames(v))(*arrays)


def _mask_padded(layout, beta, decay, device_index):
    """Inside shard_map: β = 0 and decay 1 on this device's padded frames."""
    valid = _local_valid(layout, device_index)
    return beta * valid[None, :, None, None].astype(beta.dtype), jnp.where(valid[None, :, None], decay, 1.0)


def _state_passing_gdn(layout, op, eps, has_starts, q_rot, k_rot, v, beta, decay, starts, device_index,
                       *denominator):
    beta, decay = _mask_padded(layout, beta, decay, device_index)
    kwargs = {"eps": eps, "return_final_state": True, "chunk_starts": starts if has_starts else None}
    b, _, _, h, d = v.shape
    identity = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (b, h, d, d))
    start_at_identity = GDNState(ScanState(identity), ScanState(identity))
    no_values = jnp.zeros_like(v)
    # This device's frames as an affine map of the incoming state, per direction: out = in·A + B.
    _, offset = op(q_rot, k_rot, v, beta, decay, *denominator, **kwargs)
    _, numerator_map = op(q_rot, k_rot, no_values, beta, decay, initial_state=start_at_identity, **kwargs)
    maps = (numerator_map,)
    if denominator:
        q, k = denominator
        _, denominator_map = op(q, k, no_values, beta, decay, initial_state=start_at_identity, **kwargs)
        maps += (denominator_map,)
    offsets, maps = jax.tree.map(lambda a: lax.all_gather(a, layout.axis), (offset, maps))
    index = _own_index(device_index)

    def incoming(direction, order):
        """The state device `index` starts this direction's scan from: the chained maps of the devices before it."""
        scan = lambda state: getattr(state, direction)
        numerator = jnp.zeros((b, h, d, d), jnp.float32)
        den = jnp.zeros((b, h, d), jnp.float32) if denominator else None
        states = [None] * layout.size
        for j in order:
            states[j] = (numerator, den)
            numerator = jnp.einsum("bhed,bhdf->bhef", numerator, scan(maps[0]).numerator[j], precision=HIGHEST)
            numerator = numerator + scan(offsets).numerator[j]
            if denominator:
                den = jnp.einsum("bhd,bhdf->bhf", den, scan(maps[1]).numerator[j], precision=HIGHEST)
                den = den + scan(offsets).denominator[j]
        numerators = jnp.stack([s[0] for s in states])[index]
        dens = jnp.stack([s[1] for s in states])[index] if denominator else None
        return ScanState(numerators, dens)

    order = range(layout.size)
    state = GDNState(incoming("forward", order), incoming("backward", reversed(order)))
    kwargs.update(initial_state=state, return_final_state=False)
    return op(q_rot, k_rot, v, beta, decay, *denominator, **kwargs)


def _ulysses_gdn(layout, op, eps, has_starts, q_rot, k_rot, v, beta, decay, starts, device_index, *denominator):
    beta, decay = _mask_padded(layout, beta, decay, device_index)
    to_heads = lambda a, head_axis=3: lax.all_to_all(a, layout.axis, split_axis=head_axis, concat_axis=1, tiled=True)
    starts = lax.all_gather(starts, layout.axis, tiled=True) if has_starts else None
    out = op(to_heads(q_rot), to_heads(k_rot), to_heads(v), to_heads(beta), to_heads(decay, 2),
             *(to_heads(a) for a in denominator), eps=eps, chunk_starts=starts)
    return lax.all_to_all(out, layout.axis, split_axis=1, concat_axis=3, tiled=True)
