"""frame_gdn against the diffusers oracle, a naive per-frame loop, and torch autograd.

Layout of every array here is frame_gdn's: q_rot, k_rot, v, q, k (B, T, S, H, D); beta (B, T, S, H); decay (B, T, H).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_sana_wm import (
    flip_and_shift,
    torch_chunk_cam_single_path_delta_rule,
    torch_chunk_sana_gdn,
)
from jax.extend.core import jaxprs_in_params

from sanawm_jax.ops.gdn import frame_gdn

EPS = 1e-8
# float32 recurrence against a float64 reference over at most 22 frames: accumulated rounding stays near 1e-6.
FLOAT32_REL_TOL = 1e-5
# Gradients pass through the recurrence twice (forward and transposed), doubling the float32 rounding paths.
GRAD_REL_TOL = 1e-4

MAIN_NAMES = ("q_rot", "k_rot", "v", "beta", "decay", "q", "k")
CAM_NAMES = ("q_rot", "k_rot", "v", "beta", "decay")


def rel_l2(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def rotate_pairs(x, angles):
    """RoPE-style rotation of channel pairs (2i, 2i+1); x (..., D), angles broadcastable to (..., D/2)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = np.empty_like(x)
    rotated[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    rotated[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return rotated


def make_inputs(seed, batch, frames, tokens, heads, dim):
    """Model-like float64 inputs: ReLU'd RMS-normalised q/k, keys scaled by D^-1/2·S^-1/2, RoPE'd copies,
    beta = sigmoid(·), decay in (0.5, 1)."""
    rng = np.random.default_rng(seed)

    def relu_features():
        x = rng.standard_normal((batch, frames, tokens, heads, dim))
        return np.maximum(x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True)), 0.0)

    q = relu_features()
    k = relu_features() * dim**-0.5 * tokens**-0.5
    angles = rng.uniform(0.0, 2 * np.pi, (1, frames, tokens, 1, dim // 2))
    return {
        "q_rot": rotate_pairs(q, angles),
        "k_rot": rotate_pairs(k, angles),
        "v": rng.standard_normal((batch, frames, tokens, heads, dim)),
        "beta": 1.0 / (1.0 + np.exp(-rng.standard_normal((batch, frames, tokens, heads)))),
        "decay": rng.uniform(0.5, 1.0, (batch, frames, heads)),
        "q": q,
        "k": k,
    }


def run_frame_gdn(inputs, names):
    return frame_gdn(*(jnp.asarray(inputs[name], jnp.float32) for name in names), eps=EPS)


def oracle_frame_gdn(q_rot, k_rot, v, beta, decay, q=None, k=None, *, chunk_size):
    """The oracle's bidirectional composition (forward inclusive + flip_and_shift backward exclusive), as
    SanaWMBidirectionalGDNAttention / SanaWMBidirectionalGDNCamAttention build it, on frame_gdn's layout."""
    batch, frames, tokens, heads, _ = v.shape

    def frame_structure(x):  # (B, T, S, H, D) -> (B, H, T, D, S)
        return x.permute(0, 3, 1, 4, 2)

    def flat(x):  # (B, H, T, D, S) -> (B, H, D, T*S)
        return x.permute(0, 1, 3, 2, 4).reshape(batch, heads, x.shape[3], frames * tokens)

    def unflat(x):  # (B, H, E, T*S) -> (B, H, T, E, S)
        return x.view(batch, heads, x.shape[2], frames, tokens).permute(0, 1, 3, 2, 4)

    def one_direction(q_rot, k_rot, v, beta, decay, q, k):
        if q is None:
            return (unflat(torch_chunk_cam_single_path_delta_rule(
                flat(q_rot), flat(k_rot), flat(v), beta, decay, chunk_size=chunk_size)),)
        num, den = torch_chunk_sana_gdn(
            flat(q), flat(k), flat(v), flat(q_rot), flat(k_rot), beta, decay,
            chunk_size=chunk_size, return_components=True)
        return unflat(num), unflat(den)

    def shifted(x):
        return None if x is None else flip_and_shift(x, dim=2)

    def flipped(x):
        return None if x is None else x.flip(2)

    q_rot, k_rot, v = frame_structure(q_rot), frame_structure(k_rot), frame_structure(v)
    q = None if q is None else frame_structure(q)
    k = None if k is None else frame_structure(k)
    beta, decay = beta.permute(0, 3, 1, 2), decay.permute(0, 2, 1)

    forward = one_direction(q_rot, k_rot, v, beta, decay, q, k)
    backward_flipped = one_direction(
        flipped(q_rot), shifted(k_rot), shifted(v), shifted(beta), flip_and_shift(decay, dim=2, shift_val=1.0),
        flipped(q), shifted(k))
    totals = [fwd + bwd.flip(2) for fwd, bwd in zip(forward, backward_flipped)]
    output = totals[0] if q is None else totals[0] / (totals[1] + EPS)
    return output.permute(0, 2, 4, 1, 3)


def naive_frame_gdn(q_rot, k_rot, v, beta, decay, q=None, k=None):
    """Per-(batch, head) loop with explicit D×D transitions; the backward pass flips time and reads the state
    before absorbing each frame."""
    batch, frames, tokens, heads, dim = v.shape
    identity = np.eye(dim)

    def one_direction(q_rot, k_rot, v, beta, decay, q, k, exclusive):
        """q_rot, k_rot, v, q, k: (T, D, S); beta: (T, S); decay: (T,). Returns num (T, D, S), den (T, S)."""
        state, z = np.zeros((dim, dim)), np.zeros(dim)
        num, den = np.zeros((frames, dim, tokens)), np.zeros((frames, tokens))
        for t in range(frames):
            gates = np.diag(beta[t])
            new_state = state @ (decay[t] * (identity - k_rot[t] @ gates @ k_rot[t].T)) + v[t] @ gates @ k_rot[t].T
            num[t] = (state if exclusive else new_state) @ q_rot[t]
            state = new_state
            if q is not None:
                new_z = decay[t] * (identity - k[t] @ gates @ k[t].T) @ z + k[t] @ beta[t]
                den[t] = (z if exclusive else new_z) @ q[t]
                z = new_z
        return num, den

    output = np.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            per_head = [None if x is None else x[b, :, :, h].transpose(0, 2, 1) for x in (q_rot, k_rot, v, q, k)]
            q_rot_bh, k_rot_bh, v_bh, q_bh, k_bh = per_head
            args = (q_rot_bh, k_rot_bh, v_bh, beta[b, :, :, h], decay[b, :, h], q_bh, k_bh)
            num_fwd, den_fwd = one_direction(*args, exclusive=False)
            reversed_args = [None if x is None else x[::-1] for x in args]
            num_bwd, den_bwd = (x[::-1] for x in one_direction(*reversed_args, exclusive=True))
            num = num_fwd + num_bwd
            if q is not None:
                num = num / (den_fwd + den_bwd + EPS)[:, None, :]
            output[b, :, :, h] = num.transpose(0, 2, 1)
    return output


def torch_inputs(inputs, names, requires_grad=False):
    return [torch.tensor(inputs[name], dtype=torch.float64, requires_grad=requires_grad) for name in names]


BRANCHES = {"main": MAIN_NAMES, "camera": CAM_NAMES}


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("dim,tokens,batch", [(16, 6, 2), (112, 10, 1)])
@pytest.mark.parametrize("frames", [1, 2, 5, 22])
def test_matches_oracle_composition_for_any_oracle_chunking(branch, frames, dim, tokens, batch):
    names = BRANCHES[branch]
    inputs = make_inputs(seed=frames * dim, batch=batch, frames=frames, tokens=tokens, heads=2, dim=dim)
    actual = run_frame_gdn(inputs, names)
    for chunk_size in (3, 21):
        expected = oracle_frame_gdn(*torch_inputs(inputs, names), chunk_size=chunk_size).numpy()
        assert rel_l2(actual, expected) <= FLOAT32_REL_TOL, chunk_size


@pytest.mark.parametrize("branch", BRANCHES)
def test_matches_naive_per_frame_loop(branch):
    names = BRANCHES[branch]
    inputs = make_inputs(seed=7, batch=2, frames=5, tokens=6, heads=2, dim=16)
    expected = naive_frame_gdn(*(inputs[name] for name in names))
    assert rel_l2(run_frame_gdn(inputs, names), expected) <= FLOAT32_REL_TOL


@pytest.mark.parametrize("branch", BRANCHES)
def test_gradients_match_torch_autograd_of_oracle(branch):
    names = BRANCHES[branch]
    inputs = make_inputs(seed=11, batch=1, frames=5, tokens=6, heads=2, dim=16)
    cotangent = np.random.default_rng(12).standard_normal(inputs["v"].shape)

    def loss(*args):
        return jnp.sum(frame_gdn(*args, eps=EPS) * cotangent)

    jax_args = [jnp.asarray(inputs[name], jnp.float32) for name in names]
    jax_grads = jax.grad(loss, argnums=tuple(range(len(names))))(*jax_args)

    torch_args = torch_inputs(inputs, names, requires_grad=True)
    torch_loss = (oracle_frame_gdn(*torch_args, chunk_size=3) * torch.from_numpy(cotangent)).sum()
    torch_grads = torch.autograd.grad(torch_loss, torch_args)

    for name, jax_grad, torch_grad in zip(names, jax_grads, torch_grads):
        assert np.all(np.isfinite(jax_grad)), name
        assert rel_l2(jax_grad, torch_grad.numpy()) <= GRAD_REL_TOL, name


@pytest.mark.parametrize("branch", BRANCHES)
def test_padded_trailing_frames_leave_valid_frames_unchanged(branch):
    names = BRANCHES[branch]
    valid_frames = 3
    inputs = make_inputs(seed=13, batch=2, frames=5, tokens=6, heads=2, dim=16)
    inputs["beta"][:, valid_frames:] = 0.0
    inputs["decay"][:, valid_frames:] = 1.0
    prefix = {name: x[:, :valid_frames] for name, x in inputs.items()}
    padded_output = run_frame_gdn(inputs, names)[:, :valid_frames]
    # Padded frames add exact zeros and multiply by exactly one; only XLA's shape-dependent op order may differ.
    assert rel_l2(padded_output, run_frame_gdn(prefix, names)) <= 1e-6


def test_output_dtype_follows_values():
    inputs = make_inputs(seed=19, batch=1, frames=2, tokens=6, heads=2, dim=16)
    args = [jnp.asarray(inputs[name], jnp.bfloat16) for name in MAIN_NAMES]
    assert frame_gdn(*args).dtype == jnp.bfloat16


def all_output_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (var.aval.shape for var in eqn.outvars)
        for sub_jaxpr in jaxprs_in_params(eqn.params):
            yield from all_output_shapes(sub_jaxpr)


@pytest.mark.parametrize("branch", BRANCHES)
def test_no_per_frame_state_tensor_is_formed(branch):
    names = BRANCHES[branch]
    frames, dim = 5, 16
    inputs = make_inputs(seed=17, batch=1, frames=frames, tokens=6, heads=2, dim=dim)
    args = [jnp.asarray(inputs[name], jnp.float32) for name in names]
    jaxpr = jax.make_jaxpr(lambda *a: frame_gdn(*a, eps=EPS))(*args).jaxpr
    shapes = list(all_output_shapes(jaxpr))
    assert any(shape[-2:] == (dim, dim) for shape in shapes), "the D×D scan carry should be visible"
    assert not [s for s in shapes if s[-2:] == (dim, dim) and frames in s[:-2]]
