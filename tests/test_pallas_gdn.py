"""The fused Pallas GDN kernels (interpret mode on CPU) against the reference op `sanawm_jax.ops.gdn.frame_gdn`,
and their lowering for NVIDIA GPUs (Triton custom calls in a `jax.export` for platform "cuda").

Errors are relative L2 norms ‖actual − expected‖ / ‖expected‖ over the whole array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.frame_gdn import frame_gdn_pallas
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import (
    SanaWMTransformer,
    abstract_params,
    init_params,
)
from sanawm_jax.ops.gdn import frame_gdn

pytestmark = [
    # JAX deprecates Pallas' Triton backend and `pallas_call` for Mosaic GPU; the kernels target Triton on purpose.
    pytest.mark.filterwarnings("ignore:.*[Tt]riton.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*pallas_call.*:DeprecationWarning"),
]

EPS = 1e-8
# Same float32 math as the reference, summed in a different order (token tiles, two directions on separate programs):
# the difference is float32 round-off accumulated over at most 22 frames.
FLOAT32_REL_TOL = 1e-5
# Gradients run the recurrence forward, recompute it and run its adjoint: more float32 rounding paths.
GRAD_REL_TOL = 1e-4
# bf16 outputs of two float32 computations agreeing to ~1e-6 differ by at most one bf16 ulp (2^-8) where rounding
# falls on different sides.
BF16_REL_TOL = 2**-8
# The VJP keeps the output residual in the input dtype, so the denominator's cotangent carries one more bf16 rounding
# than the reference's: two ulps.
BF16_GRAD_REL_TOL = 2**-7
# Central differences in float32 with step 1e-3: truncation O(h²) plus rounding ~1e-7·|L|/h ≈ 1e-4 relative.
FINITE_DIFFERENCE_REL_TOL = 2e-3

MAIN = ("q_rot", "k_rot", "v", "beta", "decay", "q", "k")
CAMERA = ("q_rot", "k_rot", "v", "beta", "decay")
BRANCHES = {"main": MAIN, "camera": CAMERA}
CUDA_EXPORT = dict(
    platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
)


# The programs here are tiny and compiling them dominates the run time; XLA's cheaper CPU backend passes roughly
# halve that without touching what is computed.
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_and_run(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=QUICK_COMPILE)(*args)


def rel_l2(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def gdn_inputs(names, *, frames, tokens, dim, heads=2, batch=1, masked_frames=0, dtype=jnp.float32, seed=0):
    """Model-like inputs: ReLU'd unit-RMS queries/keys (keys scaled by D^-1/2·S^-1/2), normal values,
    β = sigmoid(·), decay in (0.5, 1). The last `masked_frames` frames are padding: β = 0 and decay = 1."""
    rng = np.random.default_rng(seed)
    shape = (batch, frames, tokens, heads, dim)

    def features(scale=1.0):
        x = rng.standard_normal(shape)
        return np.maximum(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True)), 0.0) * scale

    key_scale = dim**-0.5 * tokens**-0.5
    inputs = {
        "q_rot": features(),
        "k_rot": features(key_scale),
        "v": rng.standard_normal(shape),
        "beta": 1.0 / (1.0 + np.exp(-rng.standard_normal(shape[:-1]))),
        "decay": rng.uniform(0.5, 1.0, (batch, frames, heads)),
        "q": features(),
        "k": features(key_scale),
    }
    inputs["beta"][:, frames - masked_frames :] = 0.0
    inputs["decay"][:, frames - masked_frames :] = 1.0
    return tuple(jnp.asarray(inputs[name], dtype) for name in names)


def read_cotangent(args):
    return jnp.asarray(np.random.default_rng(1).standard_normal(args[2].shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def run_case(branch, frames, tokens, dim, masked_frames=0, dtype=jnp.float32, chunk_size=4):
    """Inputs and {"pallas" | "reference": (output, gradients of Σ output·c)} in one compiled program.
    The Pallas output comes from the plain call (no stored states), the gradients from the custom VJP."""
    args = gdn_inputs(BRANCHES[branch], frames=frames, tokens=tokens, dim=dim, masked_frames=masked_frames, dtype=dtype)
    cotangent = read_cotangent(args)
    ops = {
        "pallas": functools.partial(frame_gdn_pallas, eps=EPS, chunk_size=chunk_size, block_tokens=16),
        "reference": functools.partial(frame_gdn, eps=EPS),
    }

    def outputs_and_gradients(args):
        loss = lambda op, a: jnp.sum(op(*a).astype(jnp.float32) * cotangent)
        return {name: (op(*args), jax.grad(functools.partial(loss, op))(args)) for name, op in ops.items()}

    return args, compile_and_run(outputs_and_gradients, args)


# (branch, frames, tokens, dim, masked_frames): T = 1 < C = 4, T = 22 not a multiple of C, S = 40 / 24 not multiples
# of the 16-token tile. The slow ones (a few seconds each) complete the grid outside the quick default run.
CASES = [
    pytest.param("main", 1, 20, 16, 0, id="main-T1"),
    pytest.param("main", 3, 40, 16, 0, id="main-T3"),
    pytest.param("main", 22, 40, 16, 5, id="main-T22-masked"),
    pytest.param("camera", 22, 40, 16, 5, id="camera-T22-masked"),
    pytest.param("main", 3, 24, 112, 1, id="main-D112-masked"),
    *(
        pytest.param(*case, marks=pytest.mark.slow, id=name)
        for name, case in {
            "camera-T1": ("camera", 1, 20, 16, 0),
            "camera-T3": ("camera", 3, 40, 16, 0),
            "main-T22": ("main", 22, 40, 16, 0),
            "camera-D112-masked": ("camera", 3, 24, 112, 1),
            "main-D112-T22": ("main", 22, 24, 112, 0),
            "camera-D112-T22": ("camera", 22, 24, 112, 0),
        }.items()
    ),
]


@pytest.mark.parametrize("branch,frames,tokens,dim,masked_frames", CASES)
def test_forward_matches_reference(branch, frames, tokens, dim, masked_frames):
    _, results = run_case(branch, frames, tokens, dim, masked_frames)
    assert rel_l2(results["pallas"][0], results["reference"][0]) <= FLOAT32_REL_TOL


@pytest.mark.parametrize("branch,frames,tokens,dim,masked_frames", CASES)
def test_gradients_match_reference_grad(branch, frames, tokens, dim, masked_frames):
    _, results = run_case(branch, frames, tokens, dim, masked_frames)
    for name, got, want in zip(BRANCHES[branch], results["pallas"][1], results["reference"][1]):
        assert np.all(np.isfinite(got)), name
        assert rel_l2(got, want) <= GRAD_REL_TOL, name


def test_gradients_match_reference_with_a_stored_state_before_every_frame():
    _, results = run_case("main", 7, 16, 16, chunk_size=1)
    for name, got, want in zip(MAIN, results["pallas"][1], results["reference"][1]):
        assert rel_l2(got, want) <= GRAD_REL_TOL, name


def test_gradients_match_finite_differences():
    args, results = run_case("main", 3, 40, 16, 0)
    rng = np.random.default_rng(2)
    # Small steps for β and the decay keep them inside (0, 1).
    directions = [rng.standard_normal(a.shape) * (0.1 if i in (3, 4) else 1.0) for i, a in enumerate(args)]
    cotangent = read_cotangent(args)
    step = 1e-3

    def difference(args, directions):
        shifted = lambda sign: (a + sign * step * d for a, d in zip(args, directions))
        loss = lambda a: jnp.sum(frame_gdn_pallas(*a, eps=EPS, chunk_size=4, block_tokens=16) * cotangent)
        return (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * step)

    numeric = float(compile_and_run(difference, args, [jnp.asarray(d, jnp.float32) for d in directions]))
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(results["pallas"][1], directions))
    assert abs(numeric - analytic) <= FINITE_DIFFERENCE_REL_TOL * abs(analytic)


@pytest.mark.parametrize("branch", ["main", pytest.param("camera", marks=pytest.mark.slow)])
def test_bf16_inputs_match_reference_within_bf16_rounding(branch):
    _, results = run_case(branch, 5, 24, 16, 1, dtype=jnp.bfloat16)
    (output, grads), (expected_output, expected_grads) = results["pallas"], results["reference"]
    assert output.dtype == jnp.bfloat16
    assert rel_l2(output, expected_output) <= BF16_REL_TOL
    for name, got, want in zip(BRANCHES[branch], grads, expected_grads):
        assert got.dtype == jnp.bfloat16, name
        assert rel_l2(got, want) <= BF16_GRAD_REL_TOL, name


def test_rejects_inconsistent_inputs():
    q_rot, k_rot, v, beta, decay, q, k = gdn_inputs(MAIN, frames=2, tokens=16, dim=16)
    with pytest.raises(ValueError, match="together"):
        frame_gdn_pallas(q_rot, k_rot, v, beta, decay, q)
    with pytest.raises(ValueError, match="beta"):
        frame_gdn_pallas(q_rot, k_rot, v, beta[:, :1], decay)
    with pytest.raises(ValueError, match="block_tokens"):
        frame_gdn_pallas(q_rot, k_rot, v, beta, decay, block_tokens=24)


# ---------------------------------------------------------------------------------------------------------------
# GPU lowering (export only; nothing runs on a GPU)


def export_for_cuda(fn, *args):
    return export.export(jax.jit(fn), **CUDA_EXPORT)(*args).mlir_module()


def assert_triton_kernels(stablehlo, kernels):
    assert "__gpu$xla.gpu.triton" in stablehlo
    for kernel in kernels:
        assert kernel in stablehlo, kernel
    assert "stablehlo.while" not in stablehlo, "an interpreted kernel loop was lowered for cuda"


@pytest.mark.parametrize("branch", BRANCHES)
def test_released_shapes_lower_to_triton_forward_and_backward(branch):
    batch, frames, tokens, heads, dim = 2, 121, 880, 20, 112
    tensor = jax.ShapeDtypeStruct((batch, frames, tokens, heads, dim), jnp.bfloat16)
    shapes = {"beta": (batch, frames, tokens, heads), "decay": (batch, frames, heads)}
    args = [jax.ShapeDtypeStruct(shapes[n], jnp.float32) if n in shapes else tensor for n in BRANCHES[branch]]
    forward = export_for_cuda(lambda *a: frame_gdn_pallas(*a), *args)
    assert_triton_kernels(forward, ["frame_gdn_forward"])
    grad = jax.grad(lambda *a: jnp.sum(frame_gdn_pallas(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
    assert_triton_kernels(export_for_cuda(grad, *args), ["frame_gdn_forward", "frame_gdn_backward"])


# ---------------------------------------------------------------------------------------------------------------
# The whole tiny model with gdn_impl="pallas"

TINY = PRESETS["sana_wm_tiny"]


def tiny_model_inputs(batch=1, frames=3, height=4, width=5, text_len=4):
    """Random model inputs with a camera and a padded last frame."""
    rng = np.random.default_rng(0)
    camera = np.concatenate([np.eye(4).reshape(-1), [4.5, 4.4, 2.2, 2.1]])
    inputs = {
        "latents": rng.standard_normal((batch, frames, height, width, TINY.in_channels)),
        "timesteps": rng.uniform(0.0, 1000.0, (batch, frames)),
        "text": rng.standard_normal((batch, text_len, TINY.caption_channels)),
        "camera_conditions": np.tile(camera, (batch, frames, 1)),
        "chunk_plucker": rng.standard_normal((batch, frames, height, width, TINY.chunk_plucker_channels)),
        "frame_valid_mask": np.repeat((np.arange(frames) < frames - 1)[None], batch, axis=0),
    }
    inputs = {name: jnp.asarray(x, jnp.float32) for name, x in inputs.items()}
    return inputs | {"text_mask": jnp.ones((batch, text_len), jnp.int32)}


def tiny_model_loss(gdn_impl):
    """params -> (Σ output·c, output) for the tiny model with the given GDN implementation."""
    model = SanaWMTransformer(TINY.replace(gdn_impl=gdn_impl))
    inputs = tiny_model_inputs()

    def loss(params):
        out = model.apply({"params": params}, **inputs)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)), out

    return loss


@pytest.fixture(scope="module")
def tiny_model_runs():
    """{impl: (grads w.r.t. params, output)} for "xla" and "pallas"; one compile per implementation."""
    params = init_params(TINY, jax.random.key(0))
    return {impl: compile_and_run(jax.grad(tiny_model_loss(impl), has_aux=True), params) for impl in ("xla", "pallas")}


@pytest.mark.slow
def test_tiny_model_output_with_pallas_gdn_equals_xla(tiny_model_runs):
    assert rel_l2(tiny_model_runs["pallas"][1], tiny_model_runs["xla"][1]) <= FLOAT32_REL_TOL


@pytest.mark.slow
def test_tiny_model_param_gradients_with_pallas_gdn_equal_xla(tiny_model_runs):
    expected = jax.tree_util.tree_leaves_with_path(tiny_model_runs["xla"][0])
    actual = jax.tree.leaves(tiny_model_runs["pallas"][0])
    for (path, want), got in zip(expected, actual):
        # 1e-5 as for outputs: the GDN gradients agree to ~1e-7 and the rest of the model is the same XLA code.
        assert rel_l2(got, want) <= FLOAT32_REL_TOL, jax.tree_util.keystr(path)


def test_tiny_model_exports_triton_kernels_for_cuda():
    params = abstract_params(TINY)
    loss = tiny_model_loss("pallas")
    assert_triton_kernels(export_for_cuda(lambda p: loss(p)[1], params), ["frame_gdn_forward"])
    grad = jax.grad(lambda p: loss(p)[0])
    assert_triton_kernels(export_for_cuda(grad, params), ["frame_gdn_forward", "frame_gdn_backward"])
