"""Frame-level bidirectional Gated-DeltaNet recurrence (float32 reference).

Per batch b and head h, frame t holds D×S matrices K_t, V_t, Q_t (S tokens of dimension D), per-token gates
β_t ∈ R^S and a per-frame decay g_t ∈ (0, 1]. A state M (E×D) absorbs frame t as

    M ← M · g_t (I − K_t diag(β_t) K_tᵀ) + V_t diag(β_t) K_tᵀ,

computed in delta-rule form, M ← g_t M + (V_t − g_t M K_t) diag(β_t) K_tᵀ, so no per-frame D×D transition
is built.
The numerator stream uses the rotated keys/queries and E = D; the denominator stream uses the unrotated keys/queries
with V_t = 1 (E = 1). The forward direction reads frame t after absorbing it (frames 1..t); the backward direction
runs from the last frame down and reads frame t before absorbing it (frames t+1..T).
"""

import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def _absorb_frame(state, key, value, beta, decay):
    """One frame of the delta rule.

    state: (B, H, E, D); key: (B, S, H, D); value: (B, S, H, E); beta: (B, S, H); decay: (B, H).
    Returns the new state (B, H, E, D).
    """
    decayed = state * decay[:, :, None, None]
    predicted = jnp.einsum("bhed,bshd->bshe", decayed, key, precision=HIGHEST)
    correction = (value - predicted) * beta[..., None]
    return decayed + jnp.einsum("bshe,bshd->bhed", correction, key, precision=HIGHEST)


def _read_state(state, query):
    """state: (B, H, E, D); query: (B, S, H, D) -> (B, S, H, E)."""
    return jnp.einsum("bhed,bshd->bshe", state, query, precision=HIGHEST)


def _scan_frames(streams, beta, decay, *, reverse):
    """Run every stream through the frames in one direction.

    streams: tuple of (key (T,B,S,H,D), value (T,B,S,H,E), query (T,B,S,H,D)), all time-major float32.
    beta: (T, B, S, H); decay: (T, B, H).
    reverse=False: forward, inclusive; reverse=True: backward, exclusive.
    Returns a tuple with one (T, B, S, H, E) output per stream.
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

    _, batch, _, heads = beta.shape
    initial_states = tuple(
        jnp.zeros((batch, heads, value.shape[-1], key.shape[-1]), jnp.float32) for key, value, _ in streams
    )
    _, outputs = lax.scan(step, initial_states, (streams, beta, decay), reverse=reverse)
    return outputs


def frame_gdn(q_rot, k_rot, v, beta, decay, q=None, k=None, *, eps=1e-8):
    """Bidirectional frame-level Gated-DeltaNet.

    q_rot, k_rot, v: (B, T, S, H, D) rotated queries/keys and values of the numerator stream.
    beta: (B, T, S, H) per-token gates; decay: (B, T, H) per-frame g_t in (0, 1].
    q, k: optional (B, T, S, H, D) unrotated queries/keys of the denominator stream.
    With q and k: main branch, returns (num_fwd + num_bwd) / (den_fwd + den_bwd + eps), shape (B, T, S, H, D).
    Without: camera single path, returns num_fwd + num_bwd.
    Output dtype = v.dtype; all recurrence math in float32. Masking of invalid frames (β = 0, decay = 1) and key
    scaling are the caller's.
    """
    if (q is None) != (k is None):
        raise ValueError("q and k of the denominator stream must be given together")

    def time_major(x):
        return jnp.moveaxis(x.astype(jnp.float32), 1, 0)

    beta_by_frame, decay_by_frame = time_major(beta), time_major(decay)
    streams = ((time_major(k_rot), time_major(v), time_major(q_rot)),)
    if q is not None:
        streams += ((time_major(k), jnp.ones_like(beta_by_frame)[..., None], time_major(q)),)

    forward = _scan_frames(streams, beta_by_frame, decay_by_frame, reverse=False)
    backward = _scan_frames(streams, beta_by_frame, decay_by_frame, reverse=True)
    totals = [jnp.moveaxis(fwd + bwd, 0, 1) for fwd, bwd in zip(forward, backward)]
    if q is None:
        (output,) = totals
    else:
        numerator, denominator = totals
        output = numerator / (denominator + eps)
    return output.astype(v.dtype)
