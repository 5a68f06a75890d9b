"""Model-level properties of the Flax DiT: parameter count, gradients, config handling, input validation."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanawm_jax.models.sana_wm.config import PRESETS, SanaWMConfig, get_config
from sanawm_jax.models.sana_wm.transformer import (
    SanaWMTransformer,
    abstract_params,
    example_inputs,
    init_params,
    init_program,
)
from sanawm_jax.models.sana_wm.layers import PatchEmbed, PatchProjection

RELEASED_PARAMETER_COUNT = 2_661_800_448
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_released_preset_has_the_released_parameter_count():
    assert count(abstract_params(PRESETS["sana_wm_2.6b"])) == RELEASED_PARAMETER_COUNT


def test_released_preset_matches_the_oracle_parameter_count():
    import torch
    from diffusers import SanaWMTransformer3DModel

    with torch.device("meta"):
        oracle = SanaWMTransformer3DModel()
    assert sum(p.numel() for p in oracle.parameters()) == RELEASED_PARAMETER_COUNT
    assert SanaWMConfig.from_diffusers_config(dict(oracle.config)) == PRESETS["sana_wm_2.6b"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_files_match_presets(name):
    assert get_config(str(CONFIGS_DIR / f"{name}.json")) == PRESETS[name]


def test_unsupported_diffusers_settings_are_rejected():
    with pytest.raises(ValueError, match="ffn_type"):
        SanaWMConfig.from_diffusers_config({"ffn_type": "mlp"})
    with pytest.raises(ValueError, match="gdn_impl"):
        PRESETS["sana_wm_tiny"].replace(gdn_impl="cuda")
    with pytest.raises(ValueError, match="unknown config"):
        get_config("no_such_preset")


@pytest.mark.parametrize("patch_size", [(1, 1, 1), (1, 2, 2), (1, 3, 3)])
def test_patch_projection_is_the_dense_layer_on_the_embedding(patch_size):
    """The composed Plücker projection (one patch conv) equals nn.Dense on PatchEmbed's output, with the same
    parameter tree as that nn.Dense; (1, 3, 3) is the padded patchify. float32 on both sides: only the order of the
    sums differs (48·9 products into 32 channels, then 32 into 40, against 48·9 into 40 with composed weights)."""
    rng = np.random.default_rng(0)
    rays = jnp.asarray(rng.standard_normal((2, 3, 6, 6, 48)), jnp.float32)
    embedder, dense = PatchEmbed(patch_size, 32), nn.Dense(40)
    draw = lambda tree: jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.2, jnp.float32), tree)
    embed_params = draw(embedder.init(jax.random.key(0), rays)["params"])
    dense_params = draw(dense.init(jax.random.key(1), jnp.zeros((1, 32)))["params"])
    expected = dense.apply({"params": dense_params}, embedder.apply({"params": embed_params}, rays))
    patches = embedder.apply({"params": embed_params}, rays, method="linear_patches")
    projected = PatchProjection(40, patch_size).apply({"params": dense_params}, patches, 32)
    assert projected.shape == expected.shape
    np.testing.assert_allclose(projected, expected, rtol=1e-5, atol=1e-5)


def test_init_params_compiles_once_per_config():
    """A second init of the same config (another key, an equal config object) reuses the first program."""
    config = PRESETS["sana_wm_tiny"].replace(num_layers=1, chunk_plucker_post_attn_blocks=1)
    first = init_params(config, jax.random.key(0))
    second = init_params(config.replace(), jax.random.key(1))
    assert init_program(config)._cache_size() == 1
    kernel = lambda params: np.asarray(params["blocks_0"]["attn"]["proj"]["kernel"])
    assert not np.array_equal(kernel(first), kernel(second))  # the key still reaches the initialisers
    np.testing.assert_array_equal(kernel(init_params(config, jax.random.key(0))), kernel(first))


def unused_parameter(path: tuple[str, ...], config: SanaWMConfig) -> bool:
    """Parameters the forward never reads: the ray-map embedder, and the GDN gates of softmax blocks."""
    if path[0] == "raymap_embedder":
        return True
    block = path[0].startswith("blocks_") and config.is_softmax_block(int(path[0].split("_")[1]))
    return block and path[1] == "attn" and path[2] in ("beta_proj", "gate_proj", "A_log", "dt_bias")


@pytest.mark.slow
def test_gradient_is_finite_and_nonzero_for_every_used_parameter():
    config = PRESETS["sana_wm_tiny"]
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in
              example_inputs(config, batch=2, frames=3, height=2, width=3, text_len=4).items()}
    inputs["timesteps"] = jnp.asarray(rng.uniform(0, 1000, (2, 3)), jnp.float32)
    inputs["text_mask"] = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    inputs["camera_conditions"] = example_inputs(config, batch=2, frames=3)["camera_conditions"].at[..., 16:].set(
        jnp.array([3.0, 2.0, 1.5, 1.0]))
    model = SanaWMTransformer(config)

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))

    grads = jax.jit(jax.grad(loss))(params)
    flat = {tuple(k.key for k in path): g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for path, grad in flat.items():
        assert np.all(np.isfinite(grad)), path
        if unused_parameter(path, config):
            assert not np.any(grad), path
        else:
            assert np.any(grad), f"zero gradient for {'/'.join(path)}"


@pytest.mark.slow
def test_remat_gives_the_same_output_and_gradient():
    config = PRESETS["sana_wm_tiny"]
    params = init_params(config, jax.random.key(1))
    inputs = example_inputs(config, frames=2, height=2, width=2)

    def loss(p, remat):
        out = SanaWMTransformer(config.replace(remat=remat)).apply({"params": p}, **inputs)
        return jnp.sum(out**2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grad = value_and_grad(params, False)
    value_remat, grad_remat = value_and_grad(params, True)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)  # same float32 ops, recomputed
    # The recomputed forward may be fused differently (multiply-adds contracted or not), so gradients agree to float32
    # rounding amplified by cancelling sums (observed <= 3e-6 relative L2 per array), not bit for bit.
    relative_l2 = lambda a, b: np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    jax.tree.map(lambda a, b: np.testing.assert_array_less(relative_l2(a, b), 1e-5), grad_remat, grad)


@pytest.mark.parametrize(
    "name, shape",
    [("latents", (1, 2, 2, 2, 5)), ("timesteps", (1, 3)), ("camera_conditions", (1, 2, 16)),
     ("chunk_plucker", (1, 2, 2, 3, 48)), ("frame_valid_mask", (2, 2)), ("text_mask", (1, 7))],
)
def test_wrong_input_shapes_are_named(name, shape):
    config = PRESETS["sana_wm_tiny"]
    inputs = example_inputs(config, frames=2, height=2, width=2, text_len=4)
    inputs["frame_valid_mask"] = jnp.ones((1, 2))
    inputs[name] = jnp.zeros(shape)
    with pytest.raises(ValueError, match=name):
        jax.eval_shape(lambda: SanaWMTransformer(config).init(jax.random.key(0), **inputs))
