"""State of the streaming mode: the DiT run one block of latent frames at a time with carried caches.

Blocks follow the chunk layout (`chunks.chunk_starts`): block 0 has `chunk_frames + 1` frames (it holds the
conditioning frame), every later block `chunk_frames`. Per layer the state holds what the next block needs from the
frames before it, as upstream's streaming generator keeps it (NVlabs/Sana `sana_gdn_camctrl_blocks.py`, the `Cached*`
attention classes, and `basic_modules.CachedGLUMBConvTemp`):

- GDN layers: the forward-scan states of the main branch (numerator and denominator) and of the camera branch (the
  backward scans stay inside a block), and the last K − 1 frames of the input of each short conv on K.
- Softmax layers: post-RoPE keys and values of the main branch and post-UCPE keys and values of the camera branch for
  a sink (block 0, kept for the whole video) plus a ring of `num_cached_blocks − 1` recent blocks. That is
  upstream's window with `sink_token` on: block c sees block 0 and blocks max(1, c − num_cached_blocks + 1) .. c − 1.
- Every layer: the last `t_kernel_size // 2` frames of the FFN's temporal-conv input.

Every array has a static shape that does not depend on the block index, so one compiled block step serves every
block after the first (block 0 has one frame more and compiles once more). Slots of the key/value cache that no block
has written yet are masked out of the softmax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.ops.gdn import ScanState


class StreamState(NamedTuple):
    """block: int32 scalar, index of the next block; start_frame: int32 scalar, its first latent frame (the RoPE
    position of its frame 0); layers: one `LayerCache` per DiT block."""

    block: jax.Array
    start_frame: jax.Array
    layers: tuple


class LayerCache(NamedTuple):
    """attention: dict of the attention caches (see `init_stream_state`); ffn: (B, t_kernel_size // 2, S, C)."""

    attention: dict
    ffn: jax.Array


def block_frames(config: SanaWMConfig, block: int) -> int:
    """Latent frames of block `block`: chunk_frames + 1 for block 0, chunk_frames after."""
    return config.chunk_frames + (1 if block == 0 else 0)


def block_bounds(config: SanaWMConfig, num_frames: int) -> list[tuple[int, int]]:
    """[(start, end)] frames of every block of a clip; num_frames must be chunk_frames * k + 1 (k >= 1)."""
    check_stream_frames(config, num_frames)
    bounds, start = [], 0
    while start < num_frames:
        end = start + block_frames(config, len(bounds))
        bounds.append((start, end))
        start = end
    return bounds


def check_stream_frames(config: SanaWMConfig, num_frames: int) -> None:
    cf = config.chunk_frames
    if num_frames < cf + 1 or (num_frames - 1) % cf:
        raise ValueError(
            f"streaming needs chunk_frames * k + 1 latent frames (k >= 1; {cf + 1}, {2 * cf + 1}, ...), got {num_frames}"
        )


def cache_tokens(config: SanaWMConfig, tokens_per_frame: int) -> tuple[int, int, int]:
    """(sink tokens, tokens per ring slot, ring slots) of a softmax layer's key/value cache."""
    return ((config.chunk_frames + 1) * tokens_per_frame, config.chunk_frames * tokens_per_frame,
            config.num_cached_blocks - 1)


def cached_key_mask(config: SanaWMConfig, tokens_per_frame: int, block: jax.Array) -> jax.Array:
    """(N_cache,) bool: the cache tokens block `block` attends to. The sink is valid from block 1 on; ring slot j
    holds blocks 1 + j, 1 + j + R, ... and is valid once block 1 + j has been written (j < block − 1)."""
    sink, per_slot, slots = cache_tokens(config, tokens_per_frame)
    sink_valid = jnp.broadcast_to(block >= 1, (sink,))
    slot_valid = jnp.arange(slots) < block - 1
    return jnp.concatenate([sink_valid, jnp.repeat(slot_valid, per_slot)])


def write_block(config: SanaWMConfig, cache: jax.Array, new: jax.Array, block: jax.Array, first: bool) -> jax.Array:
    """cache (B, N_cache, H, D) with the tokens `new` (B, N_block, H, D) of block `block` stored: block 0 (`first`,
    static) into the sink, block c >= 1 into ring slot (c − 1) mod R."""
    new = new.astype(cache.dtype)
    if first:
        return cache.at[:, : new.shape[1]].set(new)
    slots = config.num_cached_blocks - 1
    if slots == 0:
        return cache
    sink = cache.shape[1] - slots * new.shape[1]
    offset = sink + jnp.mod(block - 1, slots) * new.shape[1]
    return jax.lax.dynamic_update_slice(cache, new, (0, offset, 0, 0))


def is_first_block(config: SanaWMConfig, frames: int) -> bool:
    """Static: a block of chunk_frames + 1 frames is block 0."""
    return frames == config.chunk_frames + 1


def init_stream_state(config: SanaWMConfig, batch: int, height: int, width: int, with_camera: bool = True) -> StreamState:
    """The state before block 0: zeros (zero carried frames equal the zero padding at the start of the clip).

    height, width: the latent grid (patchified to h x w tokens per frame). Attention caches per layer:
      GDN: {"main": ScanState((B, H, D, D), (B, H, D)), "conv_k": (B, K − 1, S, C)} plus, with the camera branch,
        "camera": ScanState((B, H, D, D), None) and "conv_k_cam";
      softmax: {"key", "value"} (B, N_cache, H, D) plus, with the camera branch, "key_cam", "value_cam".
    """
    if config.mode != "streaming":
        raise ValueError(f"the stream state belongs to a model in mode 'streaming', not {config.mode!r}")
    with_camera = with_camera and config.camera_branches  # without them the model drops the camera inputs
    h, w = height // config.patch_size[1], width // config.patch_size[2]
    s, c = h * w, config.hidden_size
    heads = config.self_attention_heads
    d = c // heads
    dtype = config.compute_dtype
    zeros = lambda shape, dt=dtype: jnp.zeros(shape, dt)
    sink, per_slot, slots = cache_tokens(config, s)
    layers = []
    for index in range(config.num_layers):
        attention: dict[str, Any]
        if config.is_softmax_block(index):
            kv = (batch, sink + slots * per_slot, heads, d)
            attention = {"key": zeros(kv), "value": zeros(kv)}
            if with_camera:
                attention.update(key_cam=zeros(kv), value_cam=zeros(kv))
        else:
            tail = (batch, config.conv_kernel_size - 1, s, c)
            scan = lambda denominator: ScanState(zeros((batch, heads, d, d), jnp.float32),
                                                 zeros((batch, heads, d), jnp.float32) if denominator else None)
            attention = {"main": scan(True), "conv_k": zeros(tail)}
            if with_camera:
                attention.update(camera=scan(False), conv_k_cam=zeros(tail))
        layers.append(LayerCache(attention, zeros((batch, config.t_kernel_size // 2, s, c))))
    return StreamState(jnp.int32(0), jnp.int32(0), tuple(layers))
