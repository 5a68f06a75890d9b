"""The GDN state contract (`GDNState` initial state in, final state out, both scans) and the chunk-causal backward
scan (`chunk_starts`), for the XLA op `sanawm_jax.ops.gdn.frame_gdn` and the Pallas kernel (interpret mode on CPU).

Chaining: a sequence cut into pieces is processed piece by piece, the forward state passed left to right and the
backward state right to left; outputs, final states and the gradients of Σ output·c + Σ final_state·c' with respect
to every input and to the initial states must equal those of the whole sequence in one call.
Errors are relative L2 norms over the whole array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.frame_gdn import frame_gdn_pallas
from sanawm_jax.ops.gdn import GDNState, frame_gdn
from tests.test_pallas_gdn import (
    BRANCHES,
    EPS,
    FLOAT32_REL_TOL,
    GRAD_REL_TOL,
    assert_triton_kernels,
    compile_and_run,
    export_for_cuda,
    gdn_inputs,
    rel_l2,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*[Tt]riton.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*pallas_call.*:DeprecationWarning"),
]

# The same float32 operations as the whole-sequence call, grouped by XLA according to the piece shapes: only the
# summation order of a few reductions can differ.
XLA_CHAIN_REL_TOL = 1e-6
XLA_CHAIN_GRAD_REL_TOL = 1e-5

OPS = {
    "xla": functools.partial(frame_gdn, eps=EPS),
    "pallas": functools.partial(frame_gdn_pallas, eps=EPS, chunk_size=2, block_tokens=16),
}


def carried_state(names, *, batch, heads, dim, tokens, seed):
    """A realistic GDNState: the final state of the XLA op after three other random frames."""
    args = gdn_inputs(names, frames=3, tokens=tokens, dim=dim, heads=heads, batch=batch, seed=seed)
    return compile_and_run(lambda a: frame_gdn(*a, eps=EPS, return_final_state=True)[1], args)


def random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def chained(op, args, initial_state, cuts, chunk_starts):
    """op applied piece by piece on frames cut at `cuts`; returns (output, final GDNState) of the whole sequence.

    The backward states entering each piece come first (a right-to-left pass whose forward halves are discarded),
    then a left-to-right pass computes the outputs with both entering states known.
    """
    bounds = list(zip([0, *cuts], [*cuts, args[0].shape[1]]))
    pieces = [tuple(x[:, a:b] for x in args) for a, b in bounds]
    starts = [None if chunk_starts is None else chunk_starts[a:b] for a, b in bounds]

    def call(i, forward, backward):
        return op(*pieces[i], initial_state=GDNState(forward, backward), return_final_state=True,
                  chunk_starts=starts[i])

    entering_backward = [initial_state.backward]
    for i in range(len(pieces) - 1, 0, -1):
        placeholder = jax.tree.map(jnp.zeros_like, initial_state.forward)
        entering_backward.insert(0, call(i, placeholder, entering_backward[0])[1].backward)
    outputs, forward = [], initial_state.forward
    for i in range(len(pieces)):
        output, final = call(i, forward, entering_backward[i])
        outputs.append(output)
        forward = final.forward
        if i == 0:
            leaving_backward = final.backward
    return jnp.concatenate(outputs, axis=1), GDNState(forward, leaving_backward)


def loss_and_gradients(run, args, initial_state, seed=1):
    """Value, output, final state and gradients (w.r.t. args and initial_state) of Σ output·c + Σ final·c'."""
    output_cotangent = random_like(args[2], seed)
    state_cotangent = random_like(initial_state, seed + 1)

    def loss(args, initial_state):
        output, final = run(args, initial_state)
        total = jnp.sum(output.astype(jnp.float32) * output_cotangent)
        total += sum(jnp.sum(f * c) for f, c in zip(jax.tree.leaves(final), jax.tree.leaves(state_cotangent)))
        return total, (output, final)

    (_, (output, final)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, initial_state)
    return output, final, grads


def assert_close(actual, expected, value_tol, grad_tol, names):
    """actual/expected: (output, final state, (input grads, initial-state grads))."""
    (output, final, (d_args, d_initial)), (want_output, want_final, (want_d_args, want_d_initial)) = actual, expected
    assert rel_l2(output, want_output) <= value_tol, "output"
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(final), jax.tree.leaves(want_final)):
        assert rel_l2(got, want) <= value_tol, "final state" + jax.tree_util.keystr(path)
    for name, got, want in zip(names, d_args, want_d_args):
        assert np.all(np.isfinite(got)), name
        assert rel_l2(got, want) <= grad_tol, "d_" + name
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(d_initial), jax.tree.leaves(want_d_initial)):
        assert rel_l2(got, want) <= grad_tol, "d_initial_state" + jax.tree_util.keystr(path)


def chunk_starts_of(frames, first_chunk):
    """(T,) bool: chunks of 3 frames after a first chunk of `first_chunk` frames (upstream's layout uses 4)."""
    t = np.arange(frames)
    return jnp.asarray((t == 0) | ((t >= first_chunk) & ((t - first_chunk) % 3 == 0)))


# ---------------------------------------------------------------------------------------------------------------
# Chaining pieces equals the whole sequence


@pytest.mark.parametrize("chunk_causal", [False, True], ids=["bidirectional", "chunk-causal"])
@pytest.mark.parametrize("branch", ["main", pytest.param("camera", marks=pytest.mark.slow)])
def test_xla_chained_pieces_equal_whole_sequence(branch, chunk_causal):
    names = BRANCHES[branch]
    frames, sizes = 9, {"batch": 1, "heads": 2, "dim": 16, "tokens": 6}
    args = gdn_inputs(names, frames=frames, **sizes)
    initial_state = carried_state(names, **sizes, seed=3)
    # Cuts at 2 (inside the first chunk) and 7 (a chunk start: frames 0-3, 4-6, 7-8).
    starts = chunk_starts_of(frames, 4) if chunk_causal else None
    op = functools.partial(OPS["xla"], chunk_starts=starts)

    def whole(args, initial_state):
        return op(*args, initial_state=initial_state, return_final_state=True)

    def pieces(args, initial_state):
        return chained(OPS["xla"], args, initial_state, [2, 7], starts)

    results = compile_and_run(
        lambda a, s: [loss_and_gradients(run, a, s) for run in (pieces, whole)], args, initial_state
    )
    assert_close(*results, XLA_CHAIN_REL_TOL, XLA_CHAIN_GRAD_REL_TOL, names)


@pytest.mark.parametrize(
    "branch", ["main", pytest.param("camera", marks=pytest.mark.slow)]
)
def test_pallas_chained_pieces_equal_whole_sequence(branch):
    """Chunk-causal, cut inside a chunk: both carried states and a backward reset are exercised. The reference is
    the XLA op on the whole sequence (the Pallas whole-sequence call is `test_pallas_..._equals_xla_op`'s)."""
    names = BRANCHES[branch]
    frames, sizes = 6, {"batch": 1, "heads": 2, "dim": 16, "tokens": 16}
    args = gdn_inputs(names, frames=frames, **sizes)
    initial_state = carried_state(names, **sizes, seed=3)
    starts = chunk_starts_of(frames, 4)

    def whole(args, initial_state):
        return OPS["xla"](*args, initial_state=initial_state, return_final_state=True, chunk_starts=starts)

    def pieces(args, initial_state):
        return chained(OPS["pallas"], args, initial_state, [3], starts)

    results = compile_and_run(
        lambda a, s: [loss_and_gradients(run, a, s) for run in (pieces, whole)], args, initial_state
    )
    assert_close(*results, FLOAT32_REL_TOL, GRAD_REL_TOL, names)


# ---------------------------------------------------------------------------------------------------------------
# The Pallas kernel with carried state equals the XLA op


@pytest.mark.parametrize("chunk_causal", [False, True], ids=["bidirectional", "chunk-causal"])
@pytest.mark.parametrize("branch", ["main", pytest.param("camera", marks=pytest.mark.slow)])
def test_pallas_with_carried_state_equals_xla_op(branch, chunk_causal):
    """B = H = 2 so that a state reaching the wrong (batch, head) program would show; D = 12 is padded to 16."""
    names = BRANCHES[branch]
    frames, sizes = 5, {"batch": 2, "heads": 2, "dim": 12, "tokens": 20}
    args = gdn_inputs(names, frames=frames, **sizes)
    initial_state = carried_state(names, **sizes, seed=3)
    starts = chunk_starts_of(frames, 2) if chunk_causal else None

    def run(op, args, initial_state):
        return op(*args, initial_state=initial_state, return_final_state=True, chunk_starts=starts)

    results = compile_and_run(
        lambda a, s: [loss_and_gradients(functools.partial(run, OPS[impl]), a, s) for impl in ("pallas", "xla")],
        args, initial_state,
    )
    assert_close(*results, FLOAT32_REL_TOL, GRAD_REL_TOL, names)


# ---------------------------------------------------------------------------------------------------------------
# Meaning of chunk_starts


@pytest.mark.parametrize("branch", BRANCHES)
def test_chunk_causal_equals_chunk_by_chunk_with_carried_forward_state(branch):
    """With chunk_starts, frame t sees every earlier frame (forward scan) and the later frames of its own chunk only:
    the same as the plain bidirectional op run on one chunk at a time, starting from the forward state the earlier
    chunks left and from a zero backward state (the streaming schedule). Frame 0 opens a chunk, so the backward state
    handed to the left is zero."""
    names = BRANCHES[branch]
    frames, sizes = 10, {"batch": 1, "heads": 2, "dim": 16, "tokens": 6}
    args = gdn_inputs(names, frames=frames, **sizes)
    carried = carried_state(names, **sizes, seed=3)
    zero_backward = jax.tree.map(jnp.zeros_like, carried.backward)  # the last chunk sees no later frame
    initial_state = GDNState(carried.forward, zero_backward)
    starts = chunk_starts_of(frames, 4)  # chunks 0-3, 4-6, 7-9

    def chunk_by_chunk(args, initial_state):
        forward, outputs = initial_state.forward, []
        for a, b in [(0, 4), (4, 7), (7, 10)]:
            chunk_output, chunk_final = frame_gdn(*(x[:, a:b] for x in args), eps=EPS, return_final_state=True,
                                                  initial_state=GDNState(forward, zero_backward))
            outputs.append(chunk_output)
            forward = chunk_final.forward
        return jnp.concatenate(outputs, axis=1), forward

    def both(args, initial_state):
        whole = frame_gdn(*args, eps=EPS, initial_state=initial_state, return_final_state=True, chunk_starts=starts)
        return whole, chunk_by_chunk(args, initial_state)

    (output, final), (expected_output, forward) = compile_and_run(both, args, initial_state)
    assert rel_l2(output, expected_output) <= XLA_CHAIN_REL_TOL
    for got, want in zip(jax.tree.leaves(final.forward), jax.tree.leaves(forward)):
        assert rel_l2(got, want) <= XLA_CHAIN_REL_TOL
    assert all(not np.any(x) for x in jax.tree.leaves(final.backward))


def test_only_frame_zero_opening_a_chunk_changes_only_the_backward_final_state():
    """One chunk covering all frames is the bidirectional op: outputs and forward state unchanged, and the backward
    state handed to the left is zero (nothing before frame 0 may see this chunk)."""
    frames, sizes = 5, {"batch": 1, "heads": 2, "dim": 16, "tokens": 6}
    args = gdn_inputs(BRANCHES["main"], frames=frames, **sizes)
    initial_state = carried_state(BRANCHES["main"], **sizes, seed=3)

    def both(args, initial_state):
        run = functools.partial(frame_gdn, *args, eps=EPS, initial_state=initial_state, return_final_state=True)
        return run(), run(chunk_starts=jnp.arange(frames) == 0)

    bidirectional, (one_chunk, one_chunk_final) = compile_and_run(both, args, initial_state)
    assert rel_l2(one_chunk, bidirectional[0]) <= XLA_CHAIN_REL_TOL
    for got, want in zip(jax.tree.leaves(one_chunk_final.forward), jax.tree.leaves(bidirectional[1].forward)):
        assert rel_l2(got, want) <= XLA_CHAIN_REL_TOL
    assert all(not np.any(x) for x in jax.tree.leaves(one_chunk_final.backward))
    assert all(np.any(x) for x in jax.tree.leaves(bidirectional[1].backward))


# ---------------------------------------------------------------------------------------------------------------
# Arguments and GPU lowering


@pytest.mark.parametrize("impl", OPS)
def test_rejects_states_that_do_not_fit(impl):
    names = BRANCHES["main"]
    args = gdn_inputs(names, frames=2, tokens=16, dim=16)
    zeros = GDNState.zeros(1, 2, 16)
    camera_zeros = GDNState.zeros(1, 2, 16, with_denominator=False)
    op = OPS[impl]
    with pytest.raises(ValueError, match=r"initial_state.forward.numerator must be \(B, H, D, D\)"):
        op(*args, initial_state=GDNState.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="initial_state.forward.denominator must be"):
        op(*args, initial_state=camera_zeros)
    with pytest.raises(ValueError, match="initial_state.forward.denominator must be None"):
        op(*args[:5], initial_state=zeros)
    with pytest.raises(ValueError, match=r"chunk_starts must be \(T,\)"):
        op(*args, chunk_starts=jnp.zeros((3,), bool))


@pytest.mark.parametrize("branch", BRANCHES)
def test_state_carrying_kernel_lowers_to_triton_forward_and_backward(branch):
    """Released head size and token count (D = 112 padded to 128, S = 880 in tiles), few frames and heads."""
    names = BRANCHES[branch]
    batch, frames, tokens, heads, dim = 1, 4, 880, 2, 112
    tensor = jax.ShapeDtypeStruct((batch, frames, tokens, heads, dim), jnp.bfloat16)
    shapes = {"beta": (batch, frames, tokens, heads), "decay": (batch, frames, heads)}
    args = [jax.ShapeDtypeStruct(shapes[n], jnp.float32) if n in shapes else tensor for n in names]
    state = jax.eval_shape(lambda: GDNState.zeros(batch, heads, dim, with_denominator=branch == "main"))
    starts = jax.ShapeDtypeStruct((frames,), jnp.bool_)

    def forward(args, state, starts):
        return frame_gdn_pallas(*args, initial_state=state, return_final_state=True, chunk_starts=starts)

    def loss(args, state, starts):
        output, final = forward(args, state, starts)
        return jnp.sum(output.astype(jnp.float32)) + sum(jnp.sum(x) for x in jax.tree.leaves(final))

    assert_triton_kernels(export_for_cuda(forward, args, state, starts), ["frame_gdn_forward"])
    grad = jax.grad(loss, argnums=(0, 1))
    assert_triton_kernels(export_for_cuda(grad, args, state, starts), ["frame_gdn_forward", "frame_gdn_backward"])
