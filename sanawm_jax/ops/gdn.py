"""Frame-level bidirectional Gated-DeltaNet recurrence (float32 reference).

Per batch b and head h, frame t holds D×S matrices K_t, V_t, Q_t (S tokens of dimension D), per-token gates
β_t ∈ R^S and a per-frame decay g_t ∈ (0, 1]. A state M (E×D) absorbs frame t as

    M ← M · g_t (I − K_t diag(β_t) K_tᵀ) + V_t diag(β_t) K_tᵀ,

computed in delta-rule form, M ← g_t M + (V_t − g_t M K_t) diag(β_t) K_tᵀ, so no per-frame D×D transition
is built.
The numerator stream uses the rotated keys/queries and E = D; the denominator stream uses the unrotated keys/queries
with V_t = 1 (E = 1). The forward direction reads frame t after absorbing it (frames 1..t); the backward direction
runs from the last frame down and reads frame t before absorbing it (frames t+1..T).

State contract: a run of frames can be processed in pieces. The forward scan of a piece starts from the state the
frames on its left left behind, and the backward scan from the state the frames on its right built; each returns the
state it hands on (see `GDNState`). Chaining the pieces reproduces the whole run exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


class ScanState(NamedTuple):
    """Recurrent state of one scan direction, float32.

    numerator: (B, H, D, D) state M of the numerator stream: rows index value channels, columns key channels
      (M = Σ decayed V diag(β) Kᵀ terms; the read-out is M Q).
    denominator: (B, H, D) state z of the denominator stream (main branch); None for the camera single path.
    """

    numerator: jax.Array
    denominator: jax.Array | None = None


class GDNState(NamedTuple):
    """States of both scans at the edges of a piece of frames [t0, t1).

    As `initial_state`:
      forward: the forward scan's state after absorbing every frame before t0 (zeros at the start of the sequence);
      backward: the backward scan's state after absorbing every frame from t1 on, i.e. what frame t1 − 1 reads
        (zeros at the end of the sequence).
    As the returned final state:
      forward: after absorbing frame t1 − 1; the next piece (on the right) starts from it;
      backward: after absorbing frame t0; the previous piece (on the left) starts from it.
    """

    forward: ScanState
    backward: ScanState

    @classmethod
    def zeros(cls, batch, heads, dim, *, with_denominator=True):
        """All-zero states (the start of a sequence) for (B, H) heads of dimension D."""
        scan = ScanState(
            jnp.zeros((batch, heads, dim, dim), jnp.float32),
            jnp.zeros((batch, heads, dim), jnp.float32) if with_denominator else None,
        )
        return cls(scan, scan)


def check_state_inputs(v, with_denominator, initial_state, chunk_starts):
    """Raise ValueError naming the first argument whose shape does not fit inputs v (B, T, S, H, D)."""
    b, t, _, h, d = v.shape
    if chunk_starts is not None and chunk_starts.shape != (t,):
        raise ValueError(f"chunk_starts must be (T,) = {(t,)}, got {chunk_starts.shape}")
    if initial_state is None:
        return
    for direction, scan in zip(("forward", "backward"), initial_state):
        if scan.numerator.shape != (b, h, d, d):
            raise ValueError(
                f"initial_state.{direction}.numerator must be (B, H, D, D) = {(b, h, d, d)}, "
                f"got {scan.numerator.shape}"
            )
        if with_denominator != (scan.denominator is not None):
            need = "(B, H, D) with q and k" if with_denominator else "None without q and k"
            raise ValueError(f"initial_state.{direction}.denominator must be {need}")
        if with_denominator and scan.denominator.shape != (b, h, d):
            raise ValueError(
                f"initial_state.{direction}.denominator must be (B, H, D) = {(b, h, d)}, "
                f"got {scan.denominator.shape}"
            )


UNROLL_MAX_FRAMES = 16  # scans over at most this many frames are unrolled (see `_scan_frames`)


def _absorb_frame(state, key, value, beta, decay):
    """One frame of the delta rule, heads-major.

    state: (B, H, E, D); key: (B, H, S, D); value: (B, H, S, E); beta: (B, H, S); decay: (B, H).
    Returns the new state (B, H, E, D).
    """
    decayed = state * decay[:, :, None, None]
    predicted = jnp.einsum("bhed,bhsd->bhse", decayed, key, precision=HIGHEST)
    correction = (value - predicted) * beta[..., None]
    return decayed + jnp.einsum("bhse,bhsd->bhed", correction, key, precision=HIGHEST)


def _read_state(state, query):
    """state: (B, H, E, D); query: (B, H, S, D) -> (B, H, S, E)."""
    return jnp.einsum("bhed,bhsd->bhse", state, query, precision=HIGHEST)


def _scan_frames(streams, beta, decay, initial_states, *, reverse):
    """Run every stream through the frames in one direction.

    streams: tuple of (key (T,B,H,S,D), value (T,B,H,S,E), query (T,B,H,S,D)), all time-major, heads-major float32
    (every per-frame product is then a plain batched matmul over (B, H)).
    beta: (T, B, H, S); decay: (T, B, H); initial_states: one (B, H, E, D) state per stream.
    reverse=False: forward, inclusive; reverse=True: backward, exclusive.
    Returns (final states, one (T, B, H, S, E) output per stream).
    Up to UNROLL_MAX_FRAMES frames the scan is unrolled: on the CPU a rolled loop costs 1.2-1.45x more time at
    5-21 frames (per-iteration slicing and loop overhead, and the two directions cannot overlap); longer runs stay
    rolled to bound the program size.
    """

    def step(states, frame):
        frame_streams, frame_beta, frame_decay = frame
        new_states = tuple(
            _absorb_frame(state, key, value, frame_beta, frame_decay)
            for state, (key, value, _) in zip(states, frame_streams)
        )
        read_states = states if reverse else new_states
        outputs = tuple(_read_state(state, query) for state, (_, _, query) in zip(read_states, frame_streams))
        return new_states, outputs

    frames = beta.shape[0]
    unroll = frames if frames <= UNROLL_MAX_FRAMES else 1
    return lax.scan(step, tuple(initial_states), (streams, beta, decay), reverse=reverse, unroll=unroll)


def _stream_states(scan, with_denominator):
    """ScanState -> one (B, H, E, D) float32 state per stream (the denominator's E = 1)."""
    states = (scan.numerator.astype(jnp.float32),)
    if with_denominator:
        states += (scan.denominator.astype(jnp.float32)[:, :, None, :],)
    return states


def _scan_state(states):
    """Inverse of `_stream_states`."""
    return ScanState(states[0], states[1][:, :, 0, :] if len(states) > 1 else None)


def frame_gdn(q_rot, k_rot, v, beta, decay, q=None, k=None, *, eps=1e-8, initial_state=None,
              return_final_state=False, chunk_starts=None):
    """Bidirectional frame-level Gated-DeltaNet.

    q_rot, k_rot, v: (B, T, S, H, D) rotated queries/keys and values of the numerator stream.
    beta: (B, T, S, H) per-token gates; decay: (B, T, H) per-frame g_t in (0, 1].
    q, k: optional (B, T, S, H, D) unrotated queries/keys of the denominator stream.
    With q and k: main branch, returns (num_fwd + num_bwd) / (den_fwd + den_bwd + eps), shape (B, T, S, H, D).
    Without: camera single path, returns num_fwd + num_bwd.
    initial_state: `GDNState` the scans start from (zeros if None): this call then processes a piece of a longer
      sequence, and the output equals that of the whole sequence on these frames.
    return_final_state: also return the `GDNState` this piece hands on: `(output, final_state)`.
    chunk_starts: optional (T,) bool, the frames that open a chunk (chunk-causal mode): the backward scan is confined
      to chunks (frame t reads frames t+1 .. the end of its chunk; the backward state is reset, not carried, across a
      chunk start, so the backward final state of a piece that opens a chunk is zero). The forward scan is unchanged.
    Output dtype = v.dtype; all recurrence math and the states in float32. Masking of invalid frames (β = 0,
    decay = 1) and key scaling are the caller's.
    """
    if (q is None) != (k is None):
        raise ValueError("q and k of the denominator stream must be given together")
    with_denominator = q is not None
    check_state_inputs(v, with_denominator, initial_state, chunk_starts)
    if initial_state is None:
        b, _, _, h, d = v.shape
        initial_state = GDNState.zeros(b, h, d, with_denominator=with_denominator)

    def time_major(x):  # (B, T, S, H, ...) -> (T, B, H, S, ...)
        return jnp.moveaxis(jnp.swapaxes(x.astype(jnp.float32), 2, 3), 1, 0)

    beta_by_frame, decay_by_frame = time_major(beta), jnp.moveaxis(decay.astype(jnp.float32), 1, 0)
    streams = ((time_major(k_rot), time_major(v), time_major(q_rot)),)
    if with_denominator:
        streams += ((time_major(k), jnp.ones_like(beta_by_frame)[..., None], time_major(q)),)

    backward_beta, backward_decay = beta_by_frame, decay_by_frame
    if chunk_starts is not None:  # β = 0 and g = 0 make absorbing a chunk's first frame a reset to zero
        backward_beta = jnp.where(chunk_starts[:, None, None, None], 0.0, beta_by_frame)
        backward_decay = jnp.where(chunk_starts[:, None, None], 0.0, decay_by_frame)

    forward_final, forward = _scan_frames(
        streams, beta_by_frame, decay_by_frame, _stream_states(initial_state.forward, with_denominator), reverse=False
    )
    backward_final, backward = _scan_frames(
        streams, backward_beta, backward_decay, _stream_states(initial_state.backward, with_denominator), reverse=True
    )
    totals = [jnp.swapaxes(jnp.moveaxis(fwd + bwd, 0, 1), 2, 3) for fwd, bwd in zip(forward, backward)]
    if with_denominator:
        numerator, denominator = totals
        output = numerator / (denominator + eps)
    else:
        (output,) = totals
    output = output.astype(v.dtype)
    if return_final_state:
        return output, GDNState(_scan_state(forward_final), _scan_state(backward_final))
    return output
