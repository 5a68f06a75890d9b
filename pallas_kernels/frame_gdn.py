"""Fused Pallas kernels for the frame-level bidirectional Gated-DeltaNet (`sanawm_jax.ops.gdn.frame_gdn`).

One kernel program per (direction, batch, head) walks the frames in order (direction 0: frames 0..T-1, reading the
state after absorbing a frame; direction 1: frames T-1..0, reading it before), tiles the S tokens of each frame into
blocks of `block_tokens` rows and keeps every state in float32 on chip:

    numerator stream:   M (E×D) ← g M + (V − g M K) diag(β) Kᵀ,   num = M Q        (rotated q/k)
    denominator stream: z (D)   ← g z + K diag(β) (1 − g Kᵀ z),    den = zᵀ Q       (unrotated q/k, main branch only)

A frame is two passes over its token tiles: the first accumulates the state increment, the second reads the state
out. No per-frame D×D matrix leaves the chip; the forward of `jax.grad` additionally stores the state at chunk
boundaries (every `chunk_size` frames of the walk). Each walk starts from a given initial state and writes its final
state (the `GDNState` contract of `ops.gdn.frame_gdn`). In the backward direction, a frame flagged as a chunk start
is absorbed with β = 0 and g = 0, which resets the state (chunk-causal mode).

The backward kernel walks each direction's chunks in reverse: it recomputes the states of one chunk into a
(chunk_size + 1)-slot buffer, then runs the adjoint recurrence frame by frame. With Λ_n = ∂L/∂M_n, P = g M_{n-1},
U = V − P K and Ŷ the read cotangent:

    Λ_n     = Λ_carry + Ŷ_n Q_nᵀ              (forward direction: frame n reads M_n)
    dV      = Λ_n K diag(β)                   dβ_s = ⟨(Λ_n K)_s, U_s⟩
    dK      = Λ_nᵀ U diag(β) − Pᵀ dV           dQ   = (read state)ᵀ Ŷ
    dg      = ⟨Λ_n − dV Kᵀ, M_{n-1}⟩
    Λ_carry = g (Λ_n − dV Kᵀ)  (+ Ŷ_n Q_nᵀ in the backward direction, whose frame n reads M_{n-1})

The carry starts from the cotangent of the walk's final state and ends as the gradient of its initial state.

Tiles are read from the token-major (B, T, S, H, D) layout in place. S is zero-padded to a multiple of `block_tokens`
and D to a power of two (the Triton lowering needs power-of-two arrays); zero keys, values, queries and gates leave
the recurrence exact. On CPU the kernels run in Pallas interpret mode, on NVIDIA GPUs through the Triton lowering;
the choice is made when the call is lowered for a platform.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sanawm_jax.ops.gdn import GDNState, ScanState, check_state_inputs

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
DIRECTIONS = 2  # 0: forward (inclusive), 1: backward (exclusive)


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """Static tuning of the kernels (hashable: it is a non-differentiable argument of the custom VJP).

    chunk_size: frames between stored states in the forward of `jax.grad`; residual memory per (batch, head,
      direction) is ceil(T / chunk_size) states, the backward recomputes chunk_size + 1 states at a time.
    block_tokens: token rows per tile (a power of two, at least 16 for Triton dots).
    num_warps, num_stages: Triton launch parameters (GPU only).
    """

    eps: float = 1e-8
    chunk_size: int = 16
    block_tokens: int = 32
    num_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.block_tokens < 16 or self.block_tokens & (self.block_tokens - 1):
            raise ValueError(f"block_tokens must be a power of two >= 16, got {self.block_tokens}")


class MatrixState:
    """Numerator stream: state (E, D); per-token values (rows, E)."""

    @staticmethod
    def state_shape(dim):
        return (dim, dim)

    @staticmethod
    def apply(state, x):
        """x (rows, D) -> x stateᵀ (rows, E)."""
        return lax.dot_general(x, state, (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=F32)

    @staticmethod
    def outer(a, x):
        """a (rows, E), x (rows, D) -> aᵀ x (E, D)."""
        return lax.dot_general(a, x, (((0,), (0,)), ((), ())), precision=HIGHEST, preferred_element_type=F32)

    @staticmethod
    def expand(a, state):
        """a (rows, E) -> a state (rows, D)."""
        return lax.dot_general(a, state, (((1,), (0,)), ((), ())), precision=HIGHEST, preferred_element_type=F32)

    @staticmethod
    def per_row(a, beta):
        """a (rows, E) scaled by beta (rows,)."""
        return a * beta[:, None]

    @staticmethod
    def row_sum(a):
        return jnp.sum(a, axis=1)


class VectorState:
    """Denominator stream: state (D,) (E = 1); per-token values (rows,)."""

    @staticmethod
    def state_shape(dim):
        return (dim,)

    @staticmethod
    def apply(state, x):
        return jnp.sum(x * state[None, :], axis=1)

    @staticmethod
    def outer(a, x):
        return jnp.sum(a[:, None] * x, axis=0)

    @staticmethod
    def expand(a, state):
        return a[:, None] * state[None, :]

    @staticmethod
    def per_row(a, beta):
        return a * beta

    @staticmethod
    def row_sum(a):
        return a


class Sizes(NamedTuple):
    """Static sizes of one kernel launch (padded tokens and head dim)."""

    frames: int
    tokens: int
    dim: int
    block_tokens: int
    chunk_size: int
    kinds: tuple  # MatrixState, then VectorState for the main branch

    @property
    def tiles(self):
        return self.tokens // self.block_tokens

    @property
    def chunks(self):
        return -(-self.frames // self.chunk_size)


class Stream(NamedTuple):
    """Per-stream arrays (or Refs inside a kernel); value is None for the denominator stream (V = 1)."""

    key: Any
    value: Any
    query: Any


# ----------------------------------------------------------------------------------------------------------------
# Kernel bodies


def _tile_rows(j, sizes):
    return pl.ds(pl.multiple_of(j * sizes.block_tokens, sizes.block_tokens), sizes.block_tokens)


def _load(ref, t, rows):
    return ref[t, rows].astype(F32)


def _frame_of(n, reverse, sizes):
    """Walk position n -> frame index (reverse: this program walks the backward direction)."""
    return jnp.where(reverse, sizes.frames - 1 - n, n)


def _zero_states(sizes):
    return [jnp.zeros(kind.state_shape(sizes.dim), F32) for kind in sizes.kinds]


def _gate(keep_ref, t, reverse):
    """1, or 0 where the backward walk resets its state at frame t (a chunk start): scales β and g of frame t."""
    return jnp.where(reverse, keep_ref[t].astype(F32), 1.0)


def _absorb_frame(streams, beta_ref, t, gate, decayed, sizes):
    """States after frame t, given the decayed previous states g·M (one pass over the token tiles)."""

    def absorb_tile(j, increments):
        rows = _tile_rows(j, sizes)
        beta = gate * _load(beta_ref, t, rows)
        updated = []
        for kind, refs, state, increment in zip(sizes.kinds, streams, decayed, increments):
            key = _load(refs.key, t, rows)
            value = jnp.ones((sizes.block_tokens,), F32) if refs.value is None else _load(refs.value, t, rows)
            correction = kind.per_row(value - kind.apply(state, key), beta)
            updated.append(increment + kind.outer(correction, key))
        return updated

    increments = lax.fori_loop(0, sizes.tiles, absorb_tile, _zero_states(sizes))
    return [state + increment for state, increment in zip(decayed, increments)]


def _forward_kernel(ins, outs, *, sizes, on_gpu):
    """ins: (streams, beta (T, Sp), decay (T,), keep (T,), per-stream initial states); outs: (per-stream reads
    (T, Sp[, E]), per-stream final states, per-stream chunk states (NC, *state) or None)."""
    del on_gpu
    streams, beta_ref, decay_ref, keep_ref, initial_refs = ins
    read_refs, final_refs, state_refs = outs
    reverse = pl.program_id(0) == 1

    def step(n, states):
        t = _frame_of(n, reverse, sizes)
        if state_refs is not None:

            @pl.when(lax.rem(n, sizes.chunk_size) == 0)
            def _():
                for ref, state in zip(state_refs, states):
                    ref[lax.div(n, sizes.chunk_size)] = state

        gate = _gate(keep_ref, t, reverse)
        decay = gate * decay_ref[t].astype(F32)
        new_states = _absorb_frame(streams, beta_ref, t, gate, [decay * state for state in states], sizes)
        read_states = [jnp.where(reverse, old, new) for old, new in zip(states, new_states)]

        def read_tile(j, carry):
            rows = _tile_rows(j, sizes)
            for kind, refs, out_ref, state in zip(sizes.kinds, streams, read_refs, read_states):
                out_ref[t, rows] = kind.apply(state, _load(refs.query, t, rows))
            return carry

        lax.fori_loop(0, sizes.tiles, read_tile, 0)
        return new_states

    finals = lax.fori_loop(0, sizes.frames, step, [ref[...] for ref in initial_refs])
    for ref, state in zip(final_refs, finals):
        ref[...] = state


def _tile_gradients(kind, refs, dy_ref, grads, t, rows, beta, decay, previous, read, adjoint):
    """One stream's gradients for one token tile of frame t; writes dK, dQ (and dV) into `grads`.

    previous: M_{n-1}; read: the state frame t read; adjoint: Λ_n. Returns this tile's (dβ part (rows,),
    erased part Σ dV Kᵀ, dg part −Σ dV·(K M_{n-1}ᵀ)).
    """
    key, dy = _load(refs.key, t, rows), _load(dy_ref, t, rows)
    value = jnp.ones(beta.shape, F32) if refs.value is None else _load(refs.value, t, rows)
    key_previous = kind.apply(previous, key)
    residual = value - decay * key_previous  # U
    key_adjoint = kind.apply(adjoint, key)  # (Λ_n K)ᵀ
    d_value = kind.per_row(key_adjoint, beta)
    d_key = kind.expand(kind.per_row(residual, beta), adjoint) - decay * kind.expand(d_value, previous)
    grads.key[t, rows] = d_key.astype(grads.key.dtype)
    grads.query[t, rows] = kind.expand(dy, read).astype(grads.query.dtype)
    if grads.value is not None:
        grads.value[t, rows] = d_value.astype(grads.value.dtype)
    return kind.row_sum(key_adjoint * residual), kind.outer(d_value, key), -jnp.sum(d_value * key_previous)


def _backward_kernel(ins, outs, *, sizes, on_gpu):
    """ins: (streams, per-stream read cotangents (T, Sp[, E]), per-stream final-state cotangents, per-stream chunk
    states (NC, *state), beta, decay, keep); outs: (per-stream Stream of input gradients, d_beta (T, Sp), d_decay (T,),
    per-stream initial-state gradients, per-stream state buffers)."""
    streams, cotangent_refs, d_final_refs, state_refs, beta_ref, decay_ref, keep_ref = ins
    grad_refs, d_beta_ref, d_decay_ref, d_initial_refs, buffer_refs = outs
    reverse = pl.program_id(0) == 1
    barrier = pltriton.debug_barrier if on_gpu else (lambda: None)

    def read_adjoint(t):
        """Per stream, Σ over the tokens of frame t of Ŷ_s ⊗ Q_s."""

        def tile(j, sums):
            rows = _tile_rows(j, sizes)
            return [
                total + kind.outer(_load(dy_ref, t, rows), _load(refs.query, t, rows))
                for kind, refs, dy_ref, total in zip(sizes.kinds, streams, cotangent_refs, sums)
            ]

        return lax.fori_loop(0, sizes.tiles, tile, _zero_states(sizes))

    def frame_adjoint(start, length):
        """Adjoint step for walk position start + j, j from length − 1 down to 0; carries Λ from later frames."""

        def step(j_back, carries):
            j = length - 1 - j_back
            t = _frame_of(start + j, reverse, sizes)
            gate = _gate(keep_ref, t, reverse)
            decay = gate * decay_ref[t].astype(F32)
            previous = [ref[j] for ref in buffer_refs]
            reads = [jnp.where(reverse, prev, ref[j + 1]) for prev, ref in zip(previous, buffer_refs)]
            read_terms = read_adjoint(t)
            adjoints = [carry + jnp.where(reverse, 0.0, term) for carry, term in zip(carries, read_terms)]

            def tile(i, sums):
                rows = _tile_rows(i, sizes)
                beta = gate * _load(beta_ref, t, rows)
                parts = [
                    _tile_gradients(kind, refs, dy_ref, grads, t, rows, beta, decay, prev, read, adjoint)
                    for kind, refs, dy_ref, grads, prev, read, adjoint in zip(
                        sizes.kinds, streams, cotangent_refs, grad_refs, previous, reads, adjoints
                    )
                ]
                d_beta_ref[t, rows] = (gate * sum(part[0] for part in parts)).astype(d_beta_ref.dtype)
                return [(erased + part[1], d_decay + part[2]) for (erased, d_decay), part in zip(sums, parts)]

            zeros = [(state, jnp.zeros((), F32)) for state in _zero_states(sizes)]
            sums = lax.fori_loop(0, sizes.tiles, tile, zeros)
            d_decay = sum(jnp.sum(adj * prev) + part for adj, prev, (_, part) in zip(adjoints, previous, sums))
            d_decay_ref[t] = (gate * d_decay).astype(d_decay_ref.dtype)
            return [
                decay * (adjoint - erased) + jnp.where(reverse, term, 0.0)
                for adjoint, (erased, _), term in zip(adjoints, sums, read_terms)
            ]

        return step

    def chunk_step(c_back, carries):
        """Recompute the states of chunk c into the buffer (slot j: before walk position start + j), then run the
        adjoint through it."""
        c = sizes.chunks - 1 - c_back
        start = c * sizes.chunk_size
        length = jnp.minimum(sizes.chunk_size, sizes.frames - start)

        def recompute(j, states):
            for ref, state in zip(buffer_refs, states):
                ref[j] = state
            t = _frame_of(start + j, reverse, sizes)
            gate = _gate(keep_ref, t, reverse)
            decay = gate * decay_ref[t].astype(F32)
            return _absorb_frame(streams, beta_ref, t, gate, [decay * state for state in states], sizes)

        final = lax.fori_loop(0, length, recompute, [ref[c] for ref in state_refs])
        for ref, state in zip(buffer_refs, final):
            ref[length] = state
        barrier()  # buffer slots written by other threads are read next
        carries = lax.fori_loop(0, length, frame_adjoint(start, length), carries)
        barrier()  # and overwritten by the next chunk
        return carries

    d_initials = lax.fori_loop(0, sizes.chunks, chunk_step, [ref[...] for ref in d_final_refs])
    for ref, d_initial in zip(d_initial_refs, d_initials):
        ref[...] = d_initial


# ----------------------------------------------------------------------------------------------------------------
# pallas_call plumbing

# Batch, head and direction axes of each operand layout: "tokens" (B, T, S, H[, D]), "frames" (B, T, H),
# "frame_flags" (T,) shared by every program; the "directed_" layouts carry a leading direction axis;
# "directed_states" is (2, B, H[, slots], *state).
_LAYOUT_AXES = {
    "tokens": (0, 3, None),
    "frames": (0, 2, None),
    "frame_flags": (None, None, None),
    "directed_tokens": (1, 4, 0),
    "directed_frames": (1, 3, 0),
    "directed_states": (1, 2, 0),
}


def _block_spec(shape, layout):
    """Each (direction, batch, head) program sees the whole slab of its batch and head (and direction)."""
    batch_axis, head_axis, direction_axis = _LAYOUT_AXES[layout]
    grid_axis = {
        axis: program for program, axis in enumerate((direction_axis, batch_axis, head_axis)) if axis is not None
    }
    block = tuple(None if axis in grid_axis else size for axis, size in enumerate(shape))

    def index_map(*program):
        return tuple(program[grid_axis[axis]] if axis in grid_axis else 0 for axis in range(len(shape)))

    return pl.BlockSpec(block, index_map)


def _run(kernel, name, sizes, settings, batch, heads, cost, inputs, outputs):
    """pallas_call of `kernel(ins, outs, sizes=, on_gpu=)` over the (direction, batch, head) grid.

    inputs / outputs: lists of (pytree of arrays / ShapeDtypeStructs, layout); the kernel receives lists of the same
    pytrees of Refs and the call returns the list of output pytrees. Interpret mode on CPU, Triton on CUDA: the branch
    is picked when the call is lowered for a platform.
    """
    flat_inputs, in_def = jax.tree.flatten([tree for tree, _ in inputs])
    flat_outputs, out_def = jax.tree.flatten([tree for tree, _ in outputs])
    in_specs = [_block_spec(x.shape, layout) for tree, layout in inputs for x in jax.tree.leaves(tree)]
    out_specs = [_block_spec(x.shape, layout) for tree, layout in outputs for x in jax.tree.leaves(tree)]

    def call(on_gpu, *args):
        def flat_kernel(*refs):
            ins = jax.tree.unflatten(in_def, refs[: len(flat_inputs)])
            outs = jax.tree.unflatten(out_def, refs[len(flat_inputs) :])
            kernel(ins, outs, sizes=sizes, on_gpu=on_gpu)

        compiler_params = None
        if on_gpu:
            compiler_params = pltriton.CompilerParams(num_warps=settings.num_warps, num_stages=settings.num_stages)
        return pl.pallas_call(
            flat_kernel,
            out_shape=flat_outputs,
            grid=(DIRECTIONS, batch, heads),
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=not on_gpu,
            compiler_params=compiler_params,
            cost_estimate=cost,
            name=name,
        )(*args)

    interpreted, triton = functools.partial(call, False), functools.partial(call, True)
    results = lax.platform_dependent(*flat_inputs, cpu=interpreted, cuda=triton)
    return jax.tree.unflatten(out_def, results)


def _launch_cost(sizes, batch, heads, itemsize, *, backward, save_states):
    """FLOPs and HBM bytes of one kernel launch at the padded sizes, counting every Ref access as HBM traffic.

    Per frame and stream of state width E (D or 1), a program does 3 (forward: update prediction, increment, read)
    or 9 (backward: recomputed prediction and increment, read adjoint, 6 gradient products) rows×D×E products.
    It reads the token tensors (keys, values, queries in `itemsize` bytes, β and cotangents in float32) once per
    pass that needs them and writes float32 results; the backward also moves the recomputed states of its buffer.
    Both read one boundary state (initial state, or final-state cotangent) and write one per stream.
    """
    rows = sizes.frames * sizes.tokens  # token rows per program
    passes = 2 if backward else 1
    flops = 0
    traffic = passes * (rows + 2 * sizes.frames) * 4  # beta, decay, chunk-start flags
    for kind in sizes.kinds:
        width = sizes.dim if kind is MatrixState else 1
        state_bytes = sizes.dim * width * 4
        traffic += 2 * state_bytes
        token_inputs = (3 if kind is MatrixState else 2) * rows * sizes.dim * itemsize  # keys, (values,) queries
        flops += (9 if backward else 3) * 2 * rows * sizes.dim * width
        if backward:
            gradients = (2 * sizes.dim + (width if kind is MatrixState else 0)) * rows * 4
            buffer = (3 * sizes.frames + 2 * sizes.chunks) * state_bytes
            traffic += 2 * token_inputs + 2 * rows * width * 4 + gradients + buffer + rows * 4  # ... + d_beta
        else:
            traffic += token_inputs + rows * width * 4 + (sizes.chunks * state_bytes if save_states else 0)
    programs = DIRECTIONS * batch * heads
    return pl.CostEstimate(flops=programs * flops, transcendentals=0, bytes_accessed=programs * traffic)


def frame_gdn_costs(batch, frames, tokens, heads, dim, *, dtype=jnp.bfloat16, with_denominator=True, chunk_size=16,
                    block_tokens=32):
    """(forward, backward) `pl.CostEstimate`s of the kernels for inputs of shape (B, T, S, H, D) in `dtype`
    (the forward as run under `jax.grad`, storing chunk states)."""
    settings = KernelSettings(chunk_size=chunk_size, block_tokens=block_tokens)
    sizes = _padded_sizes((batch, frames, tokens, heads, dim), with_denominator, settings)
    itemsize = jnp.dtype(dtype).itemsize
    return tuple(
        _launch_cost(sizes, batch, heads, itemsize, backward=backward, save_states=True) for backward in (False, True)
    )


def _padded_sizes(shape, with_denominator, settings):
    """Kernel sizes for inputs of shape (B, T, S, H, D)."""
    _, frames, tokens, _, dim = shape
    block = settings.block_tokens
    return Sizes(
        frames=frames,
        tokens=-(-tokens // block) * block,
        dim=max(16, 1 << (dim - 1).bit_length()),
        block_tokens=block,
        chunk_size=settings.chunk_size,
        kinds=(MatrixState, VectorState) if with_denominator else (MatrixState,),
    )


def _pad(x, sizes):
    """Zero-pad the token axis (2) to sizes.tokens and a trailing head dim (axis 4, if any) to sizes.dim."""
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, sizes.tokens - x.shape[2])
    if x.ndim == 5:
        widths[4] = (0, sizes.dim - x.shape[4])
    return jnp.pad(x, widths)


def _padded_streams(q_rot, k_rot, v, q, k, sizes):
    streams = [Stream(_pad(k_rot, sizes), _pad(v, sizes), _pad(q_rot, sizes))]
    if q is not None:
        streams.append(Stream(_pad(k, sizes), None, _pad(q, sizes)))
    return streams


def _directed(x):
    """float32 ShapeDtypeStruct (2, *x.shape): one result per direction."""
    return jax.ShapeDtypeStruct((DIRECTIONS, *x.shape), F32)


def _per_direction_total(x, like):
    """Sum of the two directions' (2, B, T, S_pad, H[, D_pad]) results, unpadded to like's shape and dtype."""
    x = jnp.sum(x, axis=0)
    return x[tuple(slice(0, size) for size in like.shape)].astype(like.dtype)


def _directed_states(state, sizes):
    """GDNState -> per stream, the (2, B, H, *state) float32 states of the (forward, backward) walks, zero-padded to
    the kernel's head dim (zero rows/columns stay zero: the recurrence is exact)."""
    pairs = [(state.forward.numerator, state.backward.numerator)]
    if len(sizes.kinds) > 1:
        pairs.append((state.forward.denominator, state.backward.denominator))
    directed = []
    for pair in pairs:
        x = jnp.stack(pair).astype(F32)
        widths = [(0, 0)] * 3 + [(0, sizes.dim - size) for size in x.shape[3:]]
        directed.append(jnp.pad(x, widths))
    return directed


def _gdn_state(directed, dim):
    """Inverse of `_directed_states` for head dim D."""
    numerators = directed[0][:, :, :, :dim, :dim]
    denominators = directed[1][:, :, :, :dim] if len(directed) > 1 else (None, None)
    return GDNState(*(ScanState(*pair) for pair in zip(numerators, denominators)))


def _forward(settings, q_rot, k_rot, v, beta, decay, q, k, keep, initial, *, save_states):
    """keep: (T,) float32, 0 at the chunk starts of the backward walk; initial: `_directed_states`.
    Returns (output (B, T, S, H, D) in v.dtype, denominator (B, T, S, H) float32 or None, per-stream final states
    (2, B, H, *state), per-stream chunk states (2, B, H, NC, *state) or None)."""
    sizes = _padded_sizes(v.shape, q is not None, settings)
    b, _, _, h, _ = v.shape
    streams = _padded_streams(q_rot, k_rot, v, q, k, sizes)
    padded_beta = _pad(beta, sizes)
    reads = [_directed(padded_beta if s.value is None else s.value) for s in streams]  # (2, B, T, S_pad, H[, E])
    finals = [jax.ShapeDtypeStruct(x.shape, F32) for x in initial]
    states = None
    if save_states:
        states = [
            jax.ShapeDtypeStruct((DIRECTIONS, b, h, sizes.chunks, *kind.state_shape(sizes.dim)), F32)
            for kind in sizes.kinds
        ]
    cost = _launch_cost(sizes, b, h, v.dtype.itemsize, backward=False, save_states=save_states)
    read_values, final_states, chunk_states = _run(
        _forward_kernel, "frame_gdn_forward", sizes, settings, b, h, cost,
        inputs=[
            (streams, "tokens"), (padded_beta, "tokens"), (decay, "frames"), (keep, "frame_flags"),
            (initial, "directed_states"),
        ],
        outputs=[(reads, "directed_tokens"), (finals, "directed_states"), (states, "directed_states")],
    )
    numerator = _per_direction_total(read_values[0], jax.ShapeDtypeStruct(v.shape, F32))
    if q is None:
        return numerator.astype(v.dtype), None, final_states, chunk_states
    denominator = _per_direction_total(read_values[1], jax.ShapeDtypeStruct(beta.shape, F32))
    output = (numerator / (denominator + settings.eps)[..., None]).astype(v.dtype)
    return output, denominator, final_states, chunk_states


def _backward(settings, residuals, cotangents):
    q_rot, k_rot, v, beta, decay, q, k, keep, output, denominator, chunk_states = residuals
    d_output, d_final = cotangents
    sizes = _padded_sizes(v.shape, q is not None, settings)
    b, _, _, h, _ = v.shape
    d_output = d_output.astype(F32)
    if q is None:
        read_cotangents = [d_output]
    else:  # output = numerator / (denominator + eps)
        scale = 1.0 / (denominator + settings.eps)
        read_cotangents = [d_output * scale[..., None], -jnp.sum(d_output * output.astype(F32), axis=-1) * scale]
    streams = _padded_streams(q_rot, k_rot, v, q, k, sizes)
    padded_beta = _pad(beta, sizes)
    buffers = [
        jax.ShapeDtypeStruct((DIRECTIONS, b, h, sizes.chunk_size + 1, *kind.state_shape(sizes.dim)), F32)
        for kind in sizes.kinds
    ]
    cost = _launch_cost(sizes, b, h, v.dtype.itemsize, backward=True, save_states=False)
    stream_grads, d_beta, d_decay, d_initial, _ = _run(
        _backward_kernel, "frame_gdn_backward", sizes, settings, b, h, cost,
        inputs=[
            (streams, "tokens"), ([_pad(c, sizes) for c in read_cotangents], "tokens"), (d_final, "directed_states"),
            (chunk_states, "directed_states"), (padded_beta, "tokens"), (decay, "frames"), (keep, "frame_flags"),
        ],
        outputs=[
            (jax.tree.map(_directed, streams), "directed_tokens"), (_directed(padded_beta), "directed_tokens"),
            (_directed(decay), "directed_frames"), ([jax.ShapeDtypeStruct(x.shape, F32) for x in d_final],
                                                    "directed_states"),
            (buffers, "directed_states"),
        ],
    )
    main = stream_grads[0]
    d_q = d_k = None
    if q is not None:
        d_k, d_q = _per_direction_total(stream_grads[1].key, k), _per_direction_total(stream_grads[1].query, q)
    return (
        _per_direction_total(main.query, q_rot), _per_direction_total(main.key, k_rot),
        _per_direction_total(main.value, v), _per_direction_total(d_beta, beta), _per_direction_total(d_decay, decay),
        d_q, d_k, None, d_initial,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _frame_gdn(settings, q_rot, k_rot, v, beta, decay, q, k, keep, initial):
    output, _, final_states, _ = _forward(
        settings, q_rot, k_rot, v, beta, decay, q, k, keep, initial, save_states=False
    )
    return output, final_states


def _frame_gdn_fwd(settings, q_rot, k_rot, v, beta, decay, q, k, keep, initial):
    """Residuals: the inputs, the output and float32 denominator (main branch only) and the chunk states (the first
    of which is the initial state)."""
    output, denominator, final_states, chunk_states = _forward(
        settings, q_rot, k_rot, v, beta, decay, q, k, keep, initial, save_states=True
    )
    output_residual = None if q is None else output
    residuals = (q_rot, k_rot, v, beta, decay, q, k, keep, output_residual, denominator, chunk_states)
    return (output, final_states), residuals


_frame_gdn.defvjp(_frame_gdn_fwd, _backward, optimize_remat=True)


def _check_inputs(q_rot, k_rot, v, beta, decay, q, k):
    if (q is None) != (k is None):
        raise ValueError("q and k of the denominator stream must be given together")
    if v.ndim != 5:
        raise ValueError(f"v must be (B, T, S, H, D), got shape {v.shape}")
    b, t, s, h, _ = v.shape
    named = {"q_rot": q_rot, "k_rot": k_rot} | ({} if q is None else {"q": q, "k": k})
    for name, x in named.items():
        if x.shape != v.shape:
            raise ValueError(f"{name} must have the shape of v {v.shape}, got {x.shape}")
    if beta.shape != (b, t, s, h):
        raise ValueError(f"beta must be (B, T, S, H) = {(b, t, s, h)}, got {beta.shape}")
    if decay.shape != (b, t, h):
        raise ValueError(f"decay must be (B, T, H) = {(b, t, h)}, got {decay.shape}")


def frame_gdn_pallas(q_rot, k_rot, v, beta, decay, q=None, k=None, *, eps=1e-8, initial_state=None,
                     return_final_state=False, chunk_starts=None, chunk_size=16, block_tokens=32, num_warps=8,
                     num_stages=1):
    """Bidirectional frame-level Gated-DeltaNet as fused Pallas kernels; same contract as `ops.gdn.frame_gdn`.

    q_rot, k_rot, v: (B, T, S, H, D); beta: (B, T, S, H); decay: (B, T, H); q, k: optional (B, T, S, H, D)
    unrotated queries/keys of the denominator stream (main branch) — without them, the camera single path.
    initial_state: `GDNState` (float32 (B, H, D, D) numerator and, main branch only, (B, H, D) denominator states per
    direction) the walks start from, zeros if None; return_final_state: return `(output, final GDNState)`;
    chunk_starts: optional (T,) bool confining the backward walk to chunks. Their meaning is `ops.gdn.frame_gdn`'s.
    Returns (B, T, S, H, D) in v.dtype. Differentiable in every input and in the initial state (the final state's
    cotangent flows back) through a custom VJP; the tuning arguments are described in `KernelSettings`.
    """
    _check_inputs(q_rot, k_rot, v, beta, decay, q, k)
    check_state_inputs(v, q is not None, initial_state, chunk_starts)
    settings = KernelSettings(eps, chunk_size, block_tokens, num_warps, num_stages)
    b, t, _, h, d = v.shape
    if initial_state is None:
        initial_state = GDNState.zeros(b, h, d, with_denominator=q is not None)
    keep = jnp.ones((t,), F32) if chunk_starts is None else 1.0 - chunk_starts.astype(F32)
    sizes = _padded_sizes(v.shape, q is not None, settings)
    output, final_states = _frame_gdn(
        settings, q_rot, k_rot, v, beta, decay, q, k, keep, _directed_states(initial_state, sizes)
    )
    if return_final_state:
        return output, _gdn_state(final_states, d)
    return output
