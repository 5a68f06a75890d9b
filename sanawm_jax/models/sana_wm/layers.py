"""Building blocks of the SANA-WM DiT: norms, embeddings, rotary tables, the FFN and cross-attention.

Tokens are kept as (B, T, S, C): T latent frames, S = h*w tokens per frame (row-major), C channels.
Parameter names follow the diffusers module names so checkpoints convert by a fixed rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.sana_wm.chunks import later_chunk_ahead, same_chunk_ahead
from sanawm_jax.ops.attention import dot_product_attention
from sanawm_jax.ops.context_parallel import ContextLayout, frame_blocks, local_attention_cp, unblock
from sanawm_jax.ops.norm import rms_normalize
from sanawm_jax.parallel import UNCONSTRAINED, constrain

Dtype = Any


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class GroupedDense(nn.Module):
    """x (..., C_in) -> (..., parts, groups, width): a dense layer (or a 1x1 convolution, `taps` = (1, 1)) whose
    fused output is `parts` blocks (q/k/v, or the GLU's value/gate) of `groups` groups (heads, hidden channels).
    The parameters keep the stored layout, kernel (*taps, C_in, parts*groups*width) and bias (parts*groups*width,);
    the product runs on the kernel's (C_in, parts, groups, width) view, whose groups are split by the logical
    parameter axis `group_axis` ("heads", "mlp"), so a `tensor`-split run computes only its groups of every part."""

    parts: int
    groups: int
    width: int
    group_axis: str
    taps: tuple[int, ...] = ()
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        grouped = (self.parts, self.groups, self.width)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.taps, c_in, math.prod(grouped)),
                            self.param_dtype)
        kernel = constrain(kernel.reshape(c_in, *grouped), ("embed", None, self.group_axis, None))
        y = jnp.einsum("...c,cpgw->...pgw", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (math.prod(grouped),), self.param_dtype)
            y = y + bias.reshape(grouped).astype(self.dtype)
        return y


class PointwiseConv(nn.Module):
    """1x1 convolution written as a matmul over the channels: (..., C_in) -> (..., features). Parameters as an
    `nn.Conv` with kernel_size (1, 1): kernel (1, 1, C_in, features), bias (features,). XLA's CPU backend runs the
    1x1 `conv_general_dilated` about 1.4x slower than the same product as a dot (bench/RESULTS.md)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale; statistics in float32, output in `dtype`."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(self.dtype)


def layer_norm(x, eps: float = 1e-6):
    """Non-affine LayerNorm over the last axis, statistics in float32, output in x.dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    """adaLN modulation with per-frame (B, T, 1, C) shift/scale on (B, T, S, C) tokens."""
    return x * (1 + scale) + shift


def sinusoidal_timestep_embedding(timesteps, dim: int = 256, max_period: float = 10000.0):
    """(...,) float timesteps -> (..., dim) [cos | sin] embedding (flip_sin_to_cos, no frequency shift)."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = timesteps.astype(jnp.float32)[..., None] * frequencies
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nn.Module):
    """Per-frame timestep (B, T) in [0, 1000] -> (B, T, C): floor, sinusoid(256), Linear-SiLU-Linear."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps):
        embedding = sinusoidal_timestep_embedding(jnp.floor(timesteps)).astype(self.dtype)
        embedding = dense(self.hidden_size, "linear_1", self.dtype, self.param_dtype)(embedding)
        return dense(self.hidden_size, "linear_2", self.dtype, self.param_dtype)(nn.silu(embedding))


class CaptionEmbedder(nn.Module):
    """Text states (B, L, D_text) -> (B, L, C): Linear, GELU(tanh), Linear (module path `y_proj.fc1/fc2`)."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y):
        y = y.astype(self.dtype)
        y = dense(self.hidden_size, "fc1", self.dtype, self.param_dtype)(y)
        return dense(self.hidden_size, "fc2", self.dtype, self.param_dtype)(nn.gelu(y, approximate=True))


class LinearPatches(NamedTuple):
    """The inputs of a linear patch embedding, not yet embedded, with the embedding's parameters. `embed_patches`
    embeds them; `PatchProjection` applies a dense layer to the embedding without forming it."""

    inputs: jax.Array  # (B, T, H, W, C_in)
    kernel: jax.Array  # (pt, ph, pw, C_in, C)
    bias: jax.Array  # (C,)


def patch_padding(patch_size: tuple[int, int, int]):
    """Padding of the patchify convolution: "VALID", or k // 2 per axis when the last patch size is odd (as the
    released embedders)."""
    return [(k // 2, k // 2) for k in patch_size] if patch_size[-1] % 2 else "VALID"


def embed_patches(patches: LinearPatches, patch_size: tuple[int, int, int], dtype: Dtype):
    """Channels-last 3-D patchify: (B, T, H, W, C_in) -> (B, T', S, C) with S = H'*W', in `dtype`."""
    x = jax.lax.conv_general_dilated(
        patches.inputs.astype(dtype), patches.kernel.astype(dtype), window_strides=patch_size,
        padding=patch_padding(patch_size), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    ) + patches.bias.astype(dtype)
    b, t, h, w, c = x.shape
    return x.reshape(b, t, h * w, c)


class PatchEmbed(nn.Module):
    """Channels-last 3-D patchify: (B, T, H, W, C_in) -> (B, T', S, C) with S = H'*W' (module path `proj`, the
    parameters of an `nn.Conv` with kernel and stride `patch_size`)."""

    patch_size: tuple[int, int, int]
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.proj = nn.Conv(self.features, kernel_size=self.patch_size, strides=self.patch_size,
                            padding=patch_padding(self.patch_size), dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x):
        return embed_patches(self.linear_patches(x), self.patch_size, self.dtype)

    def linear_patches(self, x) -> LinearPatches:
        """x (B, T, H, W, C_in) with this embedding's parameters, not embedded."""
        if self.is_initializing():  # declares the parameters
            self.proj(jnp.zeros((1, *self.patch_size, x.shape[-1]), self.dtype))
        params = self.proj.variables["params"]
        return LinearPatches(x, params["kernel"], params["bias"])


class PatchProjection(nn.Module):
    """A dense layer (C -> features) on the output of a linear patch embedding, given the embedding's inputs
    (`LinearPatches`): (B, T, H, W, C_in) -> (B, T', S, features). The two linear maps compose into one patch
    convolution with kernel K·W and bias b·W + b_W (composed in float32), so each token costs C_in·patch
    multiply-adds per output channel instead of C; the result is that of `nn.Dense(features)` on the embedding up to
    rounding. Parameters as that `nn.Dense`: kernel (C, features), bias (features,).
    """

    features: int
    patch_size: tuple[int, int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: LinearPatches | None, embed_features: int):
        """embed_features: C, the embedding's width. patches None: declares the parameters and returns None."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (embed_features, self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if patches is None:
            return None
        compose = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST,
                                    preferred_element_type=jnp.float32)
        kernel = kernel.astype(jnp.float32)
        composed = LinearPatches(
            patches.inputs,
            compose("...c,cd->...d", patches.kernel.astype(jnp.float32), kernel),
            compose("c,cd->d", patches.bias.astype(jnp.float32), kernel) + bias.astype(jnp.float32),
        )
        return embed_patches(composed, self.patch_size, self.dtype)


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    """Per-axis rotary angle tables (float32), split t/h/w as in the released model.

    Returns three arrays (max_seq_len, n_t), (max_seq_len, n_h), (max_seq_len, n_w) of angles, where n_h = n_w =
    head_dim // 6 complex pairs and n_t takes the rest of the head_dim // 2 pairs (40/36/36 channels for D=112).
    """
    pairs_hw = head_dim // 6
    pairs_t = head_dim // 2 - 2 * pairs_hw
    positions = np.arange(max_seq_len, dtype=np.float32)

    def axis_table(pairs):
        dim = 2 * pairs
        inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        return np.outer(positions, inv_freq.astype(np.float32)).astype(np.float32)

    return axis_table(pairs_t), axis_table(pairs_hw), axis_table(pairs_hw)


class RotaryTables(NamedTuple):
    """Per-channel rotary tables of N tokens, (N, 2P) each: cos repeated over each channel pair, sin signed (−, +)."""

    cos: jnp.ndarray
    sin: jnp.ndarray


def rotary_tables(grid: tuple[int, int, int], head_dim: int, max_seq_len: int, pairs=None,
                  start_frame=None) -> RotaryTables:
    """Rotary tables for every token of a (T, H, W) grid, (T*H*W, 2 * (pairs_t + pairs_h + pairs_w)) float32.

    `pairs` = (n_t, n_h, n_w) keeps only the leading pairs of each axis (the reduced table of the UCPE camera branch).
    `start_frame` (int32 scalar, may be traced; streaming mode): frames sit at absolute positions start_frame + t.
    cos and sin are taken of the per-axis angle tables on the host, so the program only gathers table rows: computed
    in the program, XLA fused them into every rotation and evaluated them again for each head and channel.
    """
    t, h, w = grid
    if max(grid) > max_seq_len:
        raise ValueError(f"latent grid {grid} exceeds the rotary table length {max_seq_len}")
    angles = rope_frequencies(head_dim, max_seq_len)
    if pairs is not None:
        angles = tuple(table[:, :n] for table, n in zip(angles, pairs))

    def token_table(table_t, table_h, table_w):
        """Per-axis (max_seq_len, 2n) tables -> (T*H*W, 2(n_t + n_h + n_w)), the axes side by side per token."""
        table_t, table_h, table_w = (jnp.asarray(table) for table in (table_t, table_h, table_w))
        if start_frame is None:
            frames_t = table_t[:t]
        else:
            frames_t = jax.lax.dynamic_slice_in_dim(table_t, start_frame, t, axis=0)
        parts = [
            jnp.broadcast_to(frames_t[:, None, None], (t, h, w, table_t.shape[1])),
            jnp.broadcast_to(table_h[None, :h, None], (t, h, w, table_h.shape[1])),
            jnp.broadcast_to(table_w[None, None, :w], (t, h, w, table_w.shape[1])),
        ]
        return jnp.concatenate(parts, axis=-1).reshape(t * h * w, -1)

    cos = [np.repeat(np.cos(table), 2, axis=-1) for table in angles]
    signed_sin = [np.stack([-np.sin(table), np.sin(table)], -1).reshape(len(table), -1) for table in angles]
    return RotaryTables(token_table(*cos), token_table(*signed_sin))


def apply_rope(x, tables: RotaryTables, inverse: bool = False):
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, N, H, 2P) by the angles of `tables`
    (`rotary_tables`); float32 math.

    Written as x·cos + swap(x)·(−sin, sin), swap exchanging the two channels of each pair: one elementwise pass over
    x, where splitting the pairs with stride-2 slices and stacking the rotated halves back runs about 2x slower on
    XLA's CPU backend (bench/RESULTS.md).
    """
    cos, signed_sin = (table[None, :, None, :] for table in tables)
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    return (x32 * cos + swapped * (-signed_sin if inverse else signed_sin)).astype(x.dtype)


def depthwise_conv(x, kernel):
    """Per-channel convolution with zero "same" padding, as a sum of shifted products of the padded input.

    x (B, *spatial, C); kernel (*taps, C) with an odd tap count per spatial axis. Products are accumulated in float32;
    the result has x's dtype. XLA fuses the whole sum into one elementwise loop, where a grouped
    `lax.conv_general_dilated` runs far slower on the CPU backend (see bench/RESULTS.md).
    """
    taps = kernel.shape[:-1]
    reach = [k // 2 for k in taps]
    padded = jnp.pad(x, [(0, 0)] + [(r, r) for r in reach] + [(0, 0)])
    spatial = x.shape[1:-1]
    kernel = kernel.astype(jnp.float32)
    total = jnp.zeros(x.shape, jnp.float32)
    for offsets in np.ndindex(*taps):
        window = tuple(slice(o, o + n) for o, n in zip(offsets, spatial))
        total = total + padded[(slice(None), *window)].astype(jnp.float32) * kernel[offsets]
    return total.astype(x.dtype)


def identity_tap_init(key, shape, dtype):
    """Causal kernel (K, 1, C) whose only non-zero tap is the current frame: the short conv starts as identity."""
    del key
    return jnp.zeros(shape, dtype).at[-1].set(1)


class TemporalShortConv(nn.Module):
    """Bidirectional short conv along frames: a causal depthwise kernel w (K taps) run forwards and backwards,
    minus one centre tap, i.e. the symmetric (2K-1)-tap filter [w0..w_{K-1}..w0]. (B, T, S, C) -> same.

    Parameter `kernel` has the depthwise Conv1D layout (K, 1, C); it is initialised to the identity filter.
    chunk_starts (chunk-causal mode): the forward run covers all frames, the backward run stays inside each chunk
    (taps reaching a later chunk read zero).
    context: frame-sharded input (context parallelism): the filter runs on each device's frames with halos.
    """

    kernel_size: int
    param_dtype: Dtype = jnp.float32
    chunk_starts: tuple[int, ...] | None = None
    context: ContextLayout | None = None

    @nn.compact
    def __call__(self, x, carried=None):
        """carried (streaming mode): (B, K − 1, S, C), the input frames before x; then returns (y, the last K − 1
        input frames) and x is one block: forward taps read the carried frames, backward taps stop at its end."""
        channels = x.shape[-1]
        kernel = self.param("kernel", identity_tap_init, (self.kernel_size, 1, channels), self.param_dtype)
        taps = kernel[:, 0, :]
        symmetric = jnp.concatenate([taps, taps[:-1][::-1]], axis=0)
        if carried is not None:
            extended = jnp.concatenate([carried.astype(x.dtype), x], axis=1)
            reach = self.kernel_size - 1
            y = depthwise_conv(extended, symmetric[:, None, :])[:, reach:]
            return y, extended[:, extended.shape[1] - reach :]
        if self.context is None:
            return self.filter(x, symmetric, x.shape[1])
        reach = self.kernel_size - 1
        blocks = frame_blocks(self.context, x, reach)
        index = self.context.block_frame_index(reach, x.shape[0])
        return unblock(self.context, self.filter(blocks, symmetric, self.context.frames, index), reach)

    def filter(self, x, symmetric, num_frames, frame_index=None):
        """x (B, T, S, C) -> same; frame_index (B or 1, T): the clip frame of each position (default 0..T-1) of a
        clip of num_frames frames."""
        if self.chunk_starts is None:
            return depthwise_conv(x, symmetric[:, None, :])
        return self.chunk_causal(x, symmetric.astype(jnp.float32), num_frames, frame_index)

    def chunk_causal(self, x, symmetric, num_frames, frame_index):
        """The symmetric filter with every tap on a frame of a later chunk dropped; float32 sums."""
        t, reach = x.shape[1], self.kernel_size - 1
        padded = jnp.pad(x, [(0, 0), (reach, reach), (0, 0), (0, 0)]).astype(jnp.float32)
        total = jnp.zeros(x.shape, jnp.float32)
        for index in range(2 * reach + 1):
            term = padded[:, index : index + t] * symmetric[index]
            offset = index - reach
            if offset > 0:
                ahead = same_chunk_ahead(self.chunk_starts, num_frames, offset, frame_index)
                term = term * ahead.reshape(-1, t, 1, 1)
            total = total + term
        return total.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Depthwise convolution with bias, zero "same" padding: (B, *spatial, C) -> same, or with `parts` > 1
    (B, *spatial, parts, C / parts) -> same (the channels of a `GroupedDense` output). Parameters as a grouped
    `nn.Conv` with feature_group_count = C: kernel (*kernel_size, 1, C), bias (C,)."""

    kernel_size: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    parts: int = 1

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1] * self.parts
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, 1, channels),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        if self.parts == 1:
            return depthwise_conv(x.astype(self.dtype), kernel[..., 0, :]) + bias.astype(self.dtype)
        kernel = kernel.reshape(*self.kernel_size, self.parts, -1)
        bias = bias.reshape(self.parts, -1).astype(self.dtype)
        return jnp.stack(
            [depthwise_conv(x[..., i, :].astype(self.dtype), kernel[..., i, :]) + bias[i] for i in range(self.parts)],
            axis=-2,
        )


class GLUMBConvTemp(nn.Module):
    """FFN: per-frame 1x1 conv (SiLU) -> depthwise 3x3 -> GLU(SiLU gate) -> 1x1 conv, plus a residual temporal
    conv (3 frames, full C->C). (B, T, S, C) on an (h, w) grid -> (B, T, S, C). The hidden channels (value and
    gate alike) are split over the logical axis "act_mlp"."""

    features: int
    hidden_features: int
    grid_hw: tuple[int, int]
    t_kernel_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    chunk_starts: tuple[int, ...] | None = None
    context: ContextLayout | None = None  # frame-sharded input: the temporal conv runs with halos

    def setup(self):
        self.inverted_conv = GroupedDense(2, self.hidden_features, 1, "mlp", taps=(1, 1), dtype=self.dtype,
                                          param_dtype=self.param_dtype)
        self.depth_conv = DepthwiseConv((3, 3), self.dtype, self.param_dtype, parts=2)
        self.point_conv = PointwiseConv(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.t_conv = nn.Conv(self.features, kernel_size=(self.t_kernel_size, 1),
                              padding=[(self.t_kernel_size // 2,) * 2, (0, 0)], use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype)

    def __call__(self, x, carried=None):
        """carried (streaming mode): (B, t_kernel_size // 2, S, C), the temporal-conv input frames before x; then
        returns (output, the last such frames) and x is one block: its last frames see zeros on their right."""
        b, t, s, c = x.shape
        h, w = self.grid_hw
        y = x.reshape(b * t, h, w, c)
        y = nn.silu(self.inverted_conv(y)[..., 0])  # (B*T, h, w, 2, hidden): value and gate
        y = self.depth_conv(constrain(y, (UNCONSTRAINED,) * 4 + ("act_mlp",)))
        y = self.point_conv(y[..., 0, :] * nn.silu(y[..., 1, :]))
        y = y.reshape(b, t, s, c)
        if carried is not None:
            reach = self.t_kernel_size // 2
            extended = jnp.concatenate([carried.astype(y.dtype), y], axis=1)
            return y + self.t_conv(extended)[:, reach:], extended[:, extended.shape[1] - reach :]
        if self.context is None:
            return y + self.temporal(y, t)
        reach = self.t_kernel_size // 2
        blocks = frame_blocks(self.context, y, reach)
        index = self.context.block_frame_index(reach, b)
        return y + unblock(self.context, self.temporal(blocks, self.context.frames, index), reach)

    def temporal(self, y, num_frames, frame_index=None):
        """The temporal conv of y (B, T, S, C), frames of a clip of num_frames frames at frame_index (B or 1, T)
        (default 0..T-1)."""
        temporal = self.t_conv(y)
        if self.chunk_starts is not None:
            temporal = temporal - self.taps_across_chunks(y, num_frames, frame_index)
        return temporal

    def taps_across_chunks(self, y, num_frames, frame_index):
        """Chunk-causal mode: the part of the temporal conv that reads frames of a later chunk, removed so that a
        chunk's last frames see zeros on their right (left context still comes from the previous chunk)."""
        kernel = self.t_conv.variables["params"]["kernel"].astype(self.dtype)  # (K, 1, C, C)
        t, reach = y.shape[1], self.t_kernel_size // 2
        total = jnp.zeros_like(y)
        for offset in range(1, reach + 1):
            # beyond the last frame: zero padding in both modes
            across = later_chunk_ahead(self.chunk_starts, num_frames, offset, frame_index)
            if not across.any():
                continue
            ahead = jnp.pad(y[:, offset:], [(0, 0), (0, offset), (0, 0), (0, 0)])
            ahead = ahead * jnp.asarray(across, y.dtype).reshape(-1, t, 1, 1)
            total = total + jnp.einsum("btsc,cd->btsd", ahead, kernel[reach + offset, 0])
        return total

class CrossAttention(nn.Module):
    """Masked multi-head cross-attention from tokens (B, T, S, C) to text (B, L, C), text_mask (B, L) of 0/1. With
    `context`, the frames are sharded over its axis and each device attends its own tokens."""

    num_heads: int
    qk_norm: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    context: ContextLayout | None = None

    @nn.compact
    def __call__(self, x, text, text_mask):
        b, t, s, c = x.shape
        head_dim = c // self.num_heads
        query = dense(c, "q_linear", self.dtype, self.param_dtype)(x.reshape(b, t * s, c))
        key, value = jnp.split(dense(2 * c, "kv_linear", self.dtype, self.param_dtype)(text), 2, axis=-1)
        if self.qk_norm:
            query = RMSNorm(1e-6, self.dtype, self.param_dtype, name="q_norm")(query)
            key = RMSNorm(1e-6, self.dtype, self.param_dtype, name="k_norm")(key)
        split = lambda a, seq: constrain(a.reshape(b, a.shape[1], self.num_heads, head_dim),
                                         ("batch", seq, "act_heads", "act_kv"))
        key_mask = text_mask.astype(bool)[:, None, None, :]
        attend = dot_product_attention if self.context is None else functools.partial(local_attention_cp, self.context)
        out = attend(split(query, "sequence"), split(key, "text"), split(value, "text"), scale=head_dim**-0.5,
                     key_mask=key_mask, impl=self.attention_impl)
        out = dense(c, "proj", self.dtype, self.param_dtype)(out.reshape(b, t * s, c))
        return out.reshape(b, t, s, c)
