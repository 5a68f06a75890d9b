"""The SANA-WM DiT: patchify, per-frame timestep and text conditioning, 3-D RoPE and UCPE camera transforms, a
stack of dual-branch blocks (GDN, with softmax every `softmax_every_n`-th), and the per-frame final layer.

    model = SanaWMTransformer(config)
    velocity = model.apply({"params": params}, latents, timesteps, text, text_mask,
                           camera_conditions=..., chunk_plucker=..., frame_valid_mask=None)

latents (B, T, H, W, C_in) channels-last, timesteps (B, T) in [0, 1000] (floored, per latent frame),
text (B, L, D_text), text_mask (B, L), camera_conditions (B, T, 20), chunk_plucker (B, T, H, W, 48),
frame_valid_mask (B, T) -> velocity (B, T, H, W, C_in).

Streaming mode (config.mode "streaming"): with `stream_state=` (`streaming.init_stream_state`) the call takes one
block of latent frames (chunk_frames + 1 for block 0, chunk_frames after) with its per-frame inputs and returns
(velocity, the state after the block); without it the model runs a whole clip chunk-causally.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanawm_jax.models.sana_wm import ucpe
from sanawm_jax.models.sana_wm.attention import DualBranchAttention
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.layers import (
    CaptionEmbedder,
    CrossAttention,
    GLUMBConvTemp,
    PatchEmbed,
    PatchProjection,
    RMSNorm,
    TimestepEmbedder,
    dense,
    layer_norm,
    modulate,
    rotary_tables,
)
from sanawm_jax.models.sana_wm.streaming import LayerCache, StreamState
from sanawm_jax.ops.context_parallel import ContextLayout, context_layout
from sanawm_jax.parallel import constrain

Dtype = Any
TOKENS = ("batch", "frames", "tokens", "act_embed")  # logical axes of the (B, T, S, C) tokens between blocks


def scale_shift_init(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) / shape[-1] ** 0.5).astype(dtype)


class SanaWMBlock(nn.Module):
    """adaLN-single block on (B, T, S, C): dual-branch self-attention, Plücker term, cross-attention, FFN."""

    config: SanaWMConfig
    index: int
    grid: tuple[int, int, int]
    context: ContextLayout | None = None  # frames padded and sharded over the mesh's context axis

    @nn.compact
    def __call__(self, x, text, text_mask, t_mod, rope, transforms, plucker, frame_mask, cache=None, block=None):
        """plucker: the Plücker rays (B, T, H, W, 48) with the embedder's parameters (`layers.LinearPatches`) or None.
        cache (streaming mode): this layer's `streaming.LayerCache`, x one block and `block` its index; then returns
        (x, updated cache)."""
        cfg = self.config
        b, t, s, c = x.shape
        streaming = cache is not None
        chunk_layout = None if streaming else cfg.chunk_layout(t if self.context is None else self.context.frames)
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        masked = lambda a: a if frame_mask is None else a * frame_mask.astype(a.dtype)[:, :, None, None]

        table = self.param("scale_shift_table", scale_shift_init, (6, c), param_dtype)
        modulation = table.astype(dtype) + t_mod.reshape(b, t, 6, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            modulation[:, :, i, None, :] for i in range(6)
        )

        x = masked(x)
        attention = DualBranchAttention(
            kind="softmax" if cfg.is_softmax_block(self.index) else "gdn",
            num_heads=cfg.self_attention_heads,
            grid=self.grid,
            conv_kernel_size=cfg.conv_kernel_size,
            qk_norm=cfg.qk_norm,
            attention_impl=cfg.attention_impl,
            gdn_impl=cfg.gdn_impl,
            dtype=dtype,
            param_dtype=param_dtype,
            chunk_starts=chunk_layout,
            stream_config=cfg if streaming else None,
            context=self.context,
            name="attn",
        )
        attn_in = masked(modulate(layer_norm(x), shift_msa, scale_msa))
        if streaming:
            attended, attention_cache = attention(attn_in, rope, transforms, None, cache.attention, block)
        else:
            attended = attention(attn_in, rope, transforms, frame_mask)
        x = masked(x + masked(gate_msa * attended))

        if cfg.has_plucker_proj(self.index):
            # Without Plücker inputs the parameters are declared only, so the tree does not depend on the inputs.
            projected = PatchProjection(c, cfg.patch_size, dtype, param_dtype, name="plucker_proj")(plucker, c)
            if projected is not None:
                x = x + projected

        cross = CrossAttention(cfg.num_attention_heads, cfg.cross_norm, cfg.attention_impl, dtype, param_dtype,
                               self.context, name="cross_attn")
        x = masked(x + cross(x, text, text_mask))

        mlp = GLUMBConvTemp(c, cfg.mlp_hidden_size, self.grid[1:], cfg.t_kernel_size, dtype, param_dtype,
                            chunk_starts=chunk_layout, context=self.context, name="mlp")
        mlp_in = masked(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if streaming:
            mlp_out, ffn_cache = mlp(mlp_in, cache.ffn)
            return x + gate_mlp * mlp_out, LayerCache(attention_cache, ffn_cache)
        return masked(x + masked(gate_mlp * mlp(mlp_in)))


class SanaWMTransformer(nn.Module):
    """The SANA-WM DiT (see the module docstring for the call contract)."""

    config: SanaWMConfig

    @nn.compact
    def __call__(
        self,
        latents,
        timesteps,
        text,
        text_mask,
        camera_conditions=None,
        chunk_plucker=None,
        frame_valid_mask=None,
        stream_state: StreamState | None = None,
    ):
        cfg = self.config
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        self.check_inputs(latents, timesteps, text, text_mask, camera_conditions, chunk_plucker, frame_valid_mask)
        if not cfg.camera_branches:
            camera_conditions = chunk_plucker = None
        streaming = stream_state is not None
        if streaming:
            self.check_stream(latents, frame_valid_mask, stream_state)
        start_frame = stream_state.start_frame if streaming else None
        num_frames = latents.shape[1]
        context = None if streaming else context_layout(num_frames, cfg.context_impl)
        if context is not None:  # frames padded to a multiple of the context size; padded frames never reach real ones
            latents, timesteps = context.pad(latents), context.pad(timesteps)
            chunk_plucker = None if chunk_plucker is None else context.pad(chunk_plucker)
            camera_conditions = None if camera_conditions is None else context.pad(camera_conditions, "edge")
            frame_valid_mask = None if frame_valid_mask is None else context.pad(frame_valid_mask)
        b, frames, height, width, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)
        embed = lambda name: PatchEmbed(cfg.patch_size, cfg.hidden_size, dtype, param_dtype, name=name)

        x = embed("x_embedder")(latents)
        # The checkpoint carries a ray-map embedder that the released configuration never uses.
        embed("raymap_embedder")(jnp.zeros((1, pt, ph, pw, 3), dtype))
        # Each block projects the embedded Plücker rays with a dense layer: the blocks get the rays unembedded with the
        # embedder's parameters and apply both maps as one (`PatchProjection`).
        plucker_embedder = embed("plucker_embedder")
        if chunk_plucker is not None:
            plucker = plucker_embedder.linear_patches(chunk_plucker.astype(dtype))
        else:
            plucker = None
            plucker_embedder.linear_patches(jnp.zeros((1, pt, ph, pw, cfg.chunk_plucker_channels), dtype))

        t_emb = TimestepEmbedder(cfg.hidden_size, dtype, param_dtype, name="t_embedder")(timesteps)
        t_mod = dense(6 * cfg.hidden_size, "t_block", dtype, param_dtype)(nn.silu(t_emb))

        y = CaptionEmbedder(cfg.hidden_size, dtype, param_dtype, name="y_embedder")(text)
        if cfg.y_norm:
            y = RMSNorm(1e-5, dtype, param_dtype, name="attention_y_norm")(y)

        rope = rotary_tables(grid, cfg.linear_head_dim, cfg.rope_max_seq_len, start_frame=start_frame)
        transforms = None
        if camera_conditions is not None:
            transforms = ucpe.ray_transforms(
                camera_conditions, grid, cfg.patch_size, cfg.linear_head_dim, cfg.rope_max_seq_len, start_frame
            )

        if streaming:
            caches = []
            for i in range(cfg.num_layers):
                x, cache = SanaWMBlock(cfg, i, grid, name=f"blocks_{i}")(
                    x, y, text_mask, t_mod, rope, transforms, plucker, None, stream_state.layers[i],
                    stream_state.block,
                )
                caches.append(cache)
            next_state = StreamState(stream_state.block + 1, stream_state.start_frame + frames, tuple(caches))
            return self.final_layer(x, t_emb, grid), next_state

        block_cls = nn.remat(SanaWMBlock) if cfg.remat else SanaWMBlock
        x = constrain(x, TOKENS)
        for i in range(cfg.num_layers):
            x = block_cls(cfg, i, grid, context, name=f"blocks_{i}")(
                x, y, text_mask, t_mod, rope, transforms, plucker, frame_valid_mask
            )
            x = constrain(x, TOKENS)

        return self.final_layer(x, t_emb, grid)[:, :num_frames]

    def check_stream(self, latents, frame_valid_mask, stream_state):
        cfg = self.config
        if cfg.mode != "streaming":
            raise ValueError(f"stream_state needs a model in mode 'streaming', not {cfg.mode!r}")
        if frame_valid_mask is not None:
            raise ValueError("frame_valid_mask is not supported in streaming mode (blocks are whole)")
        frames = latents.shape[1]
        if frames not in (cfg.chunk_frames, cfg.chunk_frames + 1):
            raise ValueError(
                f"a streaming block has {cfg.chunk_frames + 1} latent frames (block 0) or {cfg.chunk_frames}, "
                f"got {frames}"
            )
        if len(stream_state.layers) != cfg.num_layers:
            raise ValueError(f"stream_state has {len(stream_state.layers)} layers, the model {cfg.num_layers}")

    def final_layer(self, x, t_emb, grid):
        """Per-frame modulated LayerNorm, Linear to patch*C_out, unpatchify to (B, T, H, W, C_out)."""
        cfg = self.config
        b, t, s, c = x.shape
        out = FinalLayer(cfg, name="final_layer")(x, t_emb)
        pt, ph, pw = cfg.patch_size
        gt, gh, gw = grid
        out = out.reshape(b, gt, gh, gw, pt, ph, pw, cfg.in_channels)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, gt * pt, gh * ph, gw * pw, cfg.in_channels)

    def check_inputs(self, latents, timesteps, text, text_mask, camera_conditions, chunk_plucker, frame_valid_mask):
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, T, H, W, {cfg.in_channels}), got {latents.shape}")
        b, t, h, w, _ = latents.shape
        if h % cfg.patch_size[1] or w % cfg.patch_size[2]:
            raise ValueError(f"latent grid {(h, w)} is not divisible by the patch size {cfg.patch_size[1:]}")
        expected = {
            "timesteps": (timesteps, (b, t)),
            "text": (text, (b, text.shape[1] if text.ndim == 3 else -1, cfg.caption_channels)),
            "text_mask": (text_mask, (b, text.shape[1] if text.ndim == 3 else -1)),
            "camera_conditions": (camera_conditions, (b, t, 20)),
            "chunk_plucker": (chunk_plucker, (b, t, h, w, cfg.chunk_plucker_channels)),
            "frame_valid_mask": (frame_valid_mask, (b, t)),
        }
        for name, (value, shape) in expected.items():
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for latents {latents.shape}, got {value.shape}")


class FinalLayer(nn.Module):
    """(B, T, S, C) tokens and per-frame t (B, T, C) -> (B, T, S, patch*C_out)."""

    config: SanaWMConfig

    @nn.compact
    def __call__(self, x, t_emb):
        cfg = self.config
        c = x.shape[-1]
        table = self.param("scale_shift_table", scale_shift_init, (2, c), cfg.parameter_dtype)
        shift = table[0].astype(x.dtype) + t_emb[:, :, None, :]
        scale = table[1].astype(x.dtype) + t_emb[:, :, None, :]
        x = modulate(layer_norm(x), shift, scale)
        patch_volume = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        return dense(patch_volume * cfg.in_channels, "linear", cfg.compute_dtype, cfg.parameter_dtype)(x)


def example_inputs(config: SanaWMConfig, batch: int = 1, frames: int = 1, height: int = 1, width: int = 1,
                   text_len: int = 1, with_camera: bool = True) -> dict[str, jnp.ndarray]:
    """Zero-valued model inputs of the given sizes (latent grid in latent pixels), e.g. for `init` or `eval_shape`."""
    height, width = height * config.patch_size[1], width * config.patch_size[2]
    inputs = {
        "latents": jnp.zeros((batch, frames, height, width, config.in_channels), jnp.float32),
        "timesteps": jnp.zeros((batch, frames), jnp.float32),
        "text": jnp.zeros((batch, text_len, config.caption_channels), jnp.float32),
        "text_mask": jnp.ones((batch, text_len), jnp.int32),
    }
    if with_camera:
        inputs["camera_conditions"] = jnp.zeros((batch, frames, 20), jnp.float32).at[..., jnp.array([0, 5, 10, 15, 16, 17])].set(1.0)
        inputs["chunk_plucker"] = jnp.zeros((batch, frames, height, width, config.chunk_plucker_channels), jnp.float32)
    return inputs


@functools.cache
def init_program(config: SanaWMConfig):
    """The jitted `key -> params` initialiser of `config`; one per config, so every init of a config after the first
    compiles nothing."""
    return jax.jit(lambda key: SanaWMTransformer(config).init(key, **example_inputs(config))["params"])


def init_params(config: SanaWMConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (the full tree, camera branch included), computed by one compiled program."""
    return init_program(config)(rng)


def abstract_params(config: SanaWMConfig) -> dict:
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct tree) without allocating anything."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
