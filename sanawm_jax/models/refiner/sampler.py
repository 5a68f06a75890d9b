"""Stage-2 refinement of stage-1 latents, as diffusers' `SanaWMLTX2Refiner.__call__` (pipelines/sana_wm/refiner.py)
runs it; the values and where they come from are listed in docs/refiner.md.

The first `sink_size` latent frames are the attention sink: their K/V is captured once before RoPE at sigma 0 and
they are returned unchanged. The other frames are refined in blocks of `block_size` latent frames, left to right.
Each block starts from its stage-1 latents re-noised at the first sigma, x = (1 - s0) z + s0 eps (one eps per block),
and takes one Euler step per sigma of `sigmas` (no CFG, every token at the same timestep sigma * 1000). Its queries
attend to [sink, history, block]: the sink re-rotated to sit just before the history, and the history being the
post-RoPE K/V of the last `kv_max_frames - sink_size` refined frames, captured by one more sigma-0 forward of each
refined block under the same prefix.

    latents = refine_latents(RefinerTransformer(config), params, latents, text, text_mask, noise, fps=16.0)

Latents are channels-last (B, F, H, W, C) float32; `noise` has the same shape (frames < sink_size are not read).
`frame_noise(key, ...)` draws each frame's noise from its own index, so a stream given the key (`RefinerStream(...,
key=key)`, pushed latents only) and the whole clip given `frame_noise(key, shape)` refine alike.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sanawm_jax.models.refiner.rope import rope_tables, video_fractions
from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer

# The 3-step distilled schedule (diffusers STAGE_2_DISTILLED_SIGMA_VALUES), ending at 0.
DISTILLED_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)
SINK_SIZE = 1
BLOCK_SIZE = 3
KV_MAX_FRAMES = 11


def block_bounds(num_frames: int, sink_size: int, block_size: int) -> list[tuple[int, int]]:
    """[start, end) latent-frame ranges of the refined blocks after the sink (the last one may be shorter)."""
    return [(start, min(start + block_size, num_frames)) for start in range(sink_size, num_frames, block_size)]


def frame_rope(config, frames, height: int, width: int, fps: float):
    """(cos, sin) tables of the tokens of latent frames `frames` on a (height, width) grid."""
    fractions = video_fractions(frames, height, width, scale_factors=config.vae_scale_factors,
                                causal_offset=config.causal_offset, fps=fps,
                                max_positions=(config.pos_embed_max_pos, config.base_height, config.base_width))
    return rope_tables(fractions, config.inner_dim, config.rope_theta, config.rope_type, config.num_attention_heads)


@functools.partial(jax.jit, static_argnames=("model", "capture"))
def forward(model: RefinerTransformer, params, tokens, text, timesteps, rope, text_mask, prefix, capture=None):
    """`model.apply` compiled once per model, shapes and capture mode (shared by every stream)."""
    return model.apply({"params": params}, tokens, text, timesteps, rope, text_mask, prefix, capture=capture)


class RefinerStream:
    """Chunk-causal refinement fed incrementally, as the streaming pipeline runs it (NVlabs/Sana's
    `--refiner_block_size 3 --refiner_kv_max_frames 11`): `push` stage-1 latent frames as they are produced and
    get back every block that became complete; `finish` refines the last, shorter block. Pushing a clip in any
    pieces returns what `refine_latents` returns for the whole clip.

    Holds the sink K/V, the trimmed history K/V and the frames not yet refined. Frames are (B, n, H, W, C) float32,
    each with its re-noising draw of the same shape.
    """

    def __init__(self, model: RefinerTransformer, params, text, text_mask, *, fps: float, sigmas=DISTILLED_SIGMAS,
                 sink_size: int = SINK_SIZE, block_size: int = BLOCK_SIZE, kv_max_frames: int = KV_MAX_FRAMES,
                 key=None):
        if len(sigmas) < 2 or sigmas[-1] != 0.0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be descending and end at 0.0, got {sigmas}")
        if sink_size < 1 or block_size < 1:
            raise ValueError(f"sink_size and block_size must be positive, got {sink_size} and {block_size}")
        self.model, self.params, self.text, self.text_mask, self.fps = model, params, text, text_mask, fps
        self.sigmas = np.asarray(sigmas, np.float32)
        self.sink_size, self.block_size, self.max_history = sink_size, block_size, kv_max_frames - sink_size
        self.key = key  # draws the noise of frames pushed without it (`frame_noise`)
        self.frames = 0  # stage-1 frames received
        self._pending = self._pending_noise = None  # received, not yet refined
        self._sink = None  # (k, v) before RoPE
        self._history = None  # (k, v) after RoPE
        self._history_frames = 0

    def _forward(self, x, sigma, rope, prefix, capture=None):
        batch, frames, height, width, channels = x.shape
        tokens = x.reshape(batch, -1, channels)
        timesteps = jnp.full(tokens.shape[:2], sigma * np.float32(self.model.config.timestep_scale_multiplier),
                             jnp.float32)
        return forward(self.model, self.params, tokens, self.text, timesteps, rope, self.text_mask, prefix,
                       capture=capture)

    def _rope(self, frames, x):
        return frame_rope(self.model.config, frames, x.shape[2], x.shape[3], self.fps)

    def push(self, latents, noise=None) -> list[tuple[int, int, jax.Array]]:
        """Append stage-1 frames (and their noise, else drawn from the stream's key) -> [(start, end, frames)]
        refined or passed through (the sink, unchanged) by this call, in order."""
        if noise is None:
            if self.key is None:
                raise ValueError("push needs noise, or a key given to the stream")
            noise = frame_noise(self.key, latents.shape, self.frames)
        if noise.shape != latents.shape:
            raise ValueError(f"noise shape {noise.shape} differs from the latents' {latents.shape}")
        latents, noise = jnp.asarray(latents, jnp.float32), jnp.asarray(noise, jnp.float32)
        start = self.frames
        self.frames += latents.shape[1]
        if self._pending is not None:
            start -= self._pending.shape[1]
            latents = jnp.concatenate([self._pending, latents], axis=1)
            noise = jnp.concatenate([self._pending_noise, noise], axis=1)
        out = []
        if self._sink is None:
            if latents.shape[1] < self.sink_size:
                self._pending, self._pending_noise = latents, noise
                return out
            sink = latents[:, :self.sink_size]
            _, self._sink = self._forward(sink, np.float32(0), self._rope(range(self.sink_size), sink), None,
                                          capture="pre_rope")
            out.append((0, self.sink_size, sink))
            latents, noise, start = latents[:, self.sink_size:], noise[:, self.sink_size:], self.sink_size
        while latents.shape[1] >= self.block_size:
            out.append(self._refine_block(start, latents[:, :self.block_size], noise[:, :self.block_size]))
            latents, noise, start = latents[:, self.block_size:], noise[:, self.block_size:], start + self.block_size
        self._pending, self._pending_noise = (latents, noise) if latents.shape[1] else (None, None)
        return out

    def finish(self) -> list[tuple[int, int, jax.Array]]:
        """Refine the frames left over (fewer than a block) -> [(start, end, frames)] or []."""
        if self._sink is None:
            raise ValueError(f"the clip has {self.frames} frames but sink_size={self.sink_size}")
        if self._pending is None:
            return []
        start = self.frames - self._pending.shape[1]
        out = [self._refine_block(start, self._pending, self._pending_noise)]
        self._pending = self._pending_noise = None
        return out

    def _refine_block(self, start: int, clean, noise) -> tuple[int, int, jax.Array]:
        end = start + clean.shape[1]
        frame_tokens = clean.shape[2] * clean.shape[3]
        offset = start - self._history_frames - self.sink_size
        prefix = KVPrefix(*self._sink, self._rope(range(offset, offset + self.sink_size), clean),
                          *self._history_prefix(frame_tokens))
        rope = self._rope(range(start, end), clean)
        sigmas = self.sigmas
        x = (1.0 - sigmas[0]) * clean + sigmas[0] * noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = self._forward(x, sigma, rope, prefix).astype(jnp.float32).reshape(x.shape)
            x = euler_update(x, x - velocity * sigma, sigma, sigma_next)
        _, (new_k, new_v) = self._forward(x, np.float32(0), rope, prefix, capture="post_rope")
        if self._history is not None:
            new_k = jnp.concatenate([self._history[0], new_k], axis=2)
            new_v = jnp.concatenate([self._history[1], new_v], axis=2)
        self._history_frames += end - start
        if 0 < self.max_history:
            self._history_frames = min(self._history_frames, self.max_history)
            keep = self.max_history * frame_tokens
            new_k, new_v = new_k[:, :, -keep:], new_v[:, :, -keep:]
        self._history = (new_k, new_v)
        return start, end, x

    def _history_prefix(self, frame_tokens: int):
        """(history_k, history_v, history_mask) for the next block. With a bounded window the history is a buffer of
        the window's size whose leading unused entries are zeros and masked out, so every full block runs one
        compiled program however much history there is; unbounded, it is the history itself."""
        if self.max_history <= 0:
            return (*(self._history or (None, None)), None)
        size = self.max_history * frame_tokens
        layers, batch, width = self.model.config.num_layers, self._sink[0].shape[1], self._sink[0].shape[-1]
        buffer = jnp.zeros((layers, batch, size, width), self._sink[0].dtype)
        history = self._history or (buffer[:, :, :0], buffer[:, :, :0])
        pad = size - history[0].shape[2]
        history_k, history_v = (jnp.concatenate([buffer[:, :, :pad], h], axis=2) for h in history)
        mask = jnp.broadcast_to(jnp.arange(size) >= pad, (batch, size))
        return history_k, history_v, mask


def refine_latents(model: RefinerTransformer, params, latents, text, text_mask, noise, *, fps: float,
                   sigmas=DISTILLED_SIGMAS, sink_size: int = SINK_SIZE, block_size: int = BLOCK_SIZE,
                   kv_max_frames: int = KV_MAX_FRAMES, progress: bool = False):
    """Refine stage-1 latents (B, F, H, W, C) -> refined latents of the same shape (frames < sink_size unchanged).

    text (B, L, D) / text_mask (B, L): the connectors' output for the prompt. sigmas: descending, ending at 0.
    kv_max_frames <= sink_size keeps the whole history. `progress` shows a bar over the blocks on stderr.
    """
    num_frames = latents.shape[1]
    if num_frames <= sink_size:
        raise ValueError(f"stage-1 latents have {num_frames} frames but sink_size={sink_size}")
    stream = RefinerStream(model, params, text, text_mask, fps=fps, sigmas=sigmas, sink_size=sink_size,
                           block_size=block_size, kv_max_frames=kv_max_frames)
    pieces = stream.push(latents[:, :sink_size], noise[:, :sink_size])
    bounds = block_bounds(num_frames, sink_size, block_size)
    for start, end in tqdm(bounds, desc="refining blocks", disable=not progress, file=sys.stderr):
        pieces += stream.push(latents[:, start:end], noise[:, start:end])
    pieces += stream.finish()
    return jnp.concatenate([frames for _, _, frames in pieces], axis=1)


def frame_noise(key, shape, first_frame: int = 0):
    """Standard normal noise (B, n, H, W, C) for latent frames first_frame .. first_frame + n - 1, each frame drawn
    from `fold_in(key, frame index)` (the same frames get the same noise however a clip is split)."""
    batch, frames, *rest = shape
    draws = [jax.random.normal(jax.random.fold_in(key, first_frame + i), (batch, *rest), jnp.float32)
             for i in range(frames)]
    return jnp.stack(draws, axis=1)


def euler_update(x, denoised, sigma, sigma_next):
    """The pipeline's step from an x0 prediction: sigma 0 returns x0; otherwise the velocity (x - x0) / sigma and
    diffusers' flow-matching Euler step x + (sigma_next - sigma) * velocity."""
    if sigma <= 1e-6:
        return denoised
    velocity = (x - denoised) / sigma
    return x + (sigma_next - sigma) * velocity
