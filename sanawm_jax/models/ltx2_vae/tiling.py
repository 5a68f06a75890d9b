"""Temporally tiled decoding: long videos in bounded memory.

Tiles are windows of `tile_latent_frames` consecutive latent frames; consecutive windows share `overlap` latent
frames. A window starting at latent frame a decodes to pixel frames 8a .. 8(a + L - 1) (its first latent frame, decoded
as a video's first frame, yields the single pixel frame 8a). Where two windows overlap, the first 8(overlap - 1) pixel
frames of the later window are cross-faded linearly into the earlier one (weight x / (8(overlap - 1)) on the later
window at offset x); after that the later window alone is used. Each window sees only its own latents, so near its
edges the result approximates the untiled decode (as upstream's does); the cross-fade hides the seams.

The defaults (13 latent frames, overlap 5) are diffusers' `_temporal_tiled_decode` with the settings SANA-WM uses
(tile_sample_min_num_frames 96, stride 64, a 32-frame cross-fade). Two differences from it: upstream keeps 65 frames
of its first tile but 64 of every later one, so its output from frame 65 on lags its true position by one frame (the
first cross-fade mixes neighbouring frames) and the last frame is lost; here every tile is aligned. And the last
window is placed to end on the last latent frame (instead of shrinking), so every tile has one shape and the decoder
compiles once.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from sanawm_jax.models.ltx2_vae.codec import check_latents, decode, video_to_uint8
from sanawm_jax.models.ltx2_vae.config import VAEConfig


def tile_starts(num_latent_frames: int, tile_latent_frames: int, overlap: int) -> list[int]:
    """First latent frame of every window; the last window ends on the last latent frame ([0] for a short video)."""
    if not 2 <= overlap < tile_latent_frames:
        raise ValueError(f"overlap must be in [2, tile_latent_frames), got {overlap} with {tile_latent_frames}")
    stride = tile_latent_frames - overlap
    starts = [0]
    while starts[-1] + tile_latent_frames < num_latent_frames:
        starts.append(min(starts[-1] + stride, num_latent_frames - tile_latent_frames))
    return starts


def decode_tiled(
    params,
    latents,
    config: VAEConfig,
    tile_latent_frames: int = 13,
    overlap: int = 5,
    out: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Normalised latents (B, T, h, w, C) -> video (B, 1 + 8(T-1), 32h, 32w, 3) on the host.

    One jitted decode of (B, tile_latent_frames, h, w, C) runs per tile; finished frames are written to `out`, a
    preallocated host array: float32 (unclamped, like `decode`) or uint8 (converted by `video_to_uint8` after
    blending). Peak device memory is one tile's decode; host memory is `out` plus one tile. `progress` shows a bar
    of finished pixel frames.
    """
    latents = np.asarray(latents)
    check_latents(latents.shape, config)
    batch, num_latent, height, width, _ = latents.shape
    ratio_t, ratio_s = config.temporal_compression_ratio, config.spatial_compression_ratio
    shape = (batch, config.num_pixel_frames(num_latent), height * ratio_s, width * ratio_s, config.out_channels)
    if out is None:
        out = np.empty(shape, np.float32)
    if out.shape != shape or out.dtype not in (np.float32, np.uint8):
        raise ValueError(f"out must be a float32 or uint8 array of shape {shape}, got {out.dtype} {out.shape}")
    finish = video_to_uint8 if out.dtype == np.uint8 else (lambda frames: frames)
    starts = tile_starts(num_latent, tile_latent_frames, overlap)
    fade = ratio_t * (overlap - 1)
    weight = (np.arange(fade, dtype=np.float32) / fade)[:, None, None, None]
    tail = None  # the previous tile's frames over the current tile's cross-fade span
    bar = tqdm(total=shape[1], desc="decoding", unit="frame", disable=not progress)
    for k, start in enumerate(starts):
        frames = np.array(decode(params, latents[:, start : start + tile_latent_frames], config), np.float32)
        if k > 0:
            frames[:, :fade] = tail * (1 - weight) + frames[:, :fade] * weight
        first = ratio_t * start
        if k + 1 < len(starts):
            end = ratio_t * starts[k + 1]
            tail = frames[:, end - first : end - first + fade]
        else:
            end = shape[1]
        out[:, first:end] = finish(frames[:, : end - first])
        bar.update(end - first)
    bar.close()
    return out
