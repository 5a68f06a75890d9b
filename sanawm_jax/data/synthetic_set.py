"""Synthetic clips held in memory for short training runs and for evaluation against exact ground truth: rendered
videos with their poses, and the DiT's training arrays (VAE latents, camera tensors, caption embeddings).

    clips = render_clips(seed=7, num_clips=48, num_frames=17, size=(128, 224))
    examples, null_text = dit_examples(clips, vae_config, vae_params, text_encoder)   # for `train_in_memory`

Clips are rendered directly at the model's frame size, so their intrinsics need no resizing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sanawm_jax import camera
from sanawm_jax.data.synthetic import SyntheticClip, generate_clip, to_uint8
from sanawm_jax.models import ltx2_vae as vae


@dataclasses.dataclass(frozen=True)
class RenderedClip:
    """A synthetic clip (scene, world c2w (F, 4, 4), intrinsics (F, 4)) and its frames (F, H, W, 3) uint8."""

    clip: SyntheticClip
    frames: np.ndarray

    @property
    def model_video(self) -> np.ndarray:
        """The frames as the VAE takes them: (F, H, W, 3) float32 in [-1, 1]."""
        return self.frames.astype(np.float32) / 127.5 - 1.0


def render_clips(seed: int, num_clips: int, num_frames: int, size: tuple[int, int]) -> list[RenderedClip]:
    """Clips 0 .. num_clips - 1 of the synthetic set `seed` (`synthetic.generate_clip`) at size (H, W)."""
    clips = [generate_clip(seed, index, num_frames, *size) for index in range(num_clips)]
    return [RenderedClip(clip, to_uint8(clip.render().rgb)) for clip in clips]


def camera_tensors(clip: SyntheticClip, vae_config: vae.VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """The DiT's camera_conditions (T, 20) and chunk_plucker (T, h, w, 48) of a clip (poses relative to frame 0)."""
    conditions, plucker = camera.prepare_camera(clip.c2w, clip.intrinsics, (clip.height, clip.width),
                                                vae_config.encoder_compression)
    return np.asarray(conditions), np.asarray(plucker)


def dit_examples(clips: list[RenderedClip], vae_config: vae.VAEConfig, vae_params: dict,
                 text_encoder) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The arrays `training.in_memory.train_in_memory` draws batches from: latents (N, T, h, w, C) (normalised
    posterior means), camera_conditions (N, T, 20), chunk_plucker (N, T, h, w, 48), text (N, L, D) and text_mask
    (N, L) of the captions; and the null text ((L, D), (L,)), the empty caption encoded as a caption."""
    latents = [np.asarray(vae.encode(vae_params, rendered.model_video[None], vae_config)[0]) for rendered in clips]
    cameras = [camera_tensors(rendered.clip, vae_config) for rendered in clips]
    text, text_mask = text_encoder.encode([rendered.clip.scene.caption for rendered in clips])
    null_text, null_mask = text_encoder.encode([""])
    examples = {
        "latents": np.stack(latents),
        "camera_conditions": np.stack([conditions for conditions, _ in cameras]),
        "chunk_plucker": np.stack([plucker for _, plucker in cameras]),
        "text": np.asarray(text),
        "text_mask": np.asarray(text_mask),
    }
    return examples, (np.asarray(null_text)[0], np.asarray(null_mask)[0])
