"""How well a generated video follows its camera path, measured with the exact geometry of a synthetic scene.

For a generated frame k, the scene is rendered from candidate cameras around the true pose P_k — turned by a yaw
offset about the camera's vertical axis and moved by a forward offset along its optical axis — and the candidate
whose render is nearest to the frame (mean squared error at a quarter of the resolution, after both are blurred) is
taken as the frame's camera. The camera-following error of the frame is that candidate's offset: 0 when
the video moved exactly as the path says, the yaw error in degrees and the forward error in metres otherwise.

    errors = camera_following_error(clip, generated_frames, frames=(8, 16))   # {"yaw_deg": (2,), "forward_m": (2,)}
"""

from __future__ import annotations

import numpy as np

from sanawm_jax.data.synthetic import SyntheticClip, render, rotation_yaw_pitch_roll

YAW_OFFSETS_DEG = np.arange(-12.0, 12.01, 1.5)
FORWARD_OFFSETS_M = np.round(np.arange(-0.5, 0.501, 0.1), 6)
DOWNSCALE = 4  # candidates are rendered at 1/DOWNSCALE of the frame size; the frame is area-averaged to it
BLUR_SIDE = 3  # box blur of BLUR_SIDE x BLUR_SIDE pixels at the reduced size, of both


def candidate_poses(c2w: np.ndarray, yaw_offsets_deg, forward_offsets) -> np.ndarray:
    """(Y * Z, 4, 4) poses c2w . [R_y(yaw), (0, 0, forward)] over the grid of offsets, yaw-major."""
    yaw, forward = np.meshgrid(np.radians(yaw_offsets_deg), forward_offsets, indexing="ij")
    offsets = np.tile(np.eye(4), (yaw.size, 1, 1))
    zero = np.zeros(yaw.size)
    offsets[:, :3, :3] = rotation_yaw_pitch_roll(yaw.ravel(), zero, zero)
    offsets[:, 2, 3] = forward.ravel()
    return c2w[None] @ offsets


def _area_average(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H // DOWNSCALE, W // DOWNSCALE, 3) means of DOWNSCALE x DOWNSCALE blocks."""
    n, h, w, c = images.shape
    h, w = h // DOWNSCALE, w // DOWNSCALE
    blocks = images[:, : h * DOWNSCALE, : w * DOWNSCALE].reshape(n, h, DOWNSCALE, w, DOWNSCALE, c)
    return blocks.mean(axis=(2, 4))


def _blur(images: np.ndarray) -> np.ndarray:
    """Box blur over axes 1 and 2 of (N, h, w, 3), valid positions only."""
    for axis in (1, 2):
        images = np.lib.stride_tricks.sliding_window_view(images, BLUR_SIDE, axis=axis).mean(axis=-1)
    return images


def recover_offsets(clip: SyntheticClip, frame: np.ndarray, index: int, yaw_offsets_deg=YAW_OFFSETS_DEG,
                    forward_offsets=FORWARD_OFFSETS_M) -> tuple[float, float]:
    """(yaw offset in degrees, forward offset in metres) of the candidate camera around the clip's pose `index`
    whose render best matches `frame` (H, W, 3) (uint8 or floats in [0, 1])."""
    frame = np.asarray(frame)
    frame = frame.astype(np.float64) / 255.0 if frame.dtype == np.uint8 else frame.astype(np.float64)
    poses = candidate_poses(np.asarray(clip.c2w[index], np.float64), yaw_offsets_deg, forward_offsets)
    # The pixel-centre grid of the reduced image: pixel (i, j) covers full-size pixels DOWNSCALE*i ... DOWNSCALE*i+D-1.
    fx, fy, cx, cy = np.asarray(clip.intrinsics[index], np.float64)
    scale = 1.0 / DOWNSCALE
    reduced = [fx * scale, fy * scale, (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5]
    height, width = clip.height // DOWNSCALE, clip.width // DOWNSCALE
    renders = render(clip.scene, poses, np.tile(reduced, (len(poses), 1)), height, width).rgb
    errors = np.mean((_blur(renders) - _blur(_area_average(frame[None]))) ** 2, axis=(1, 2, 3))
    best = int(np.argmin(errors))
    return float(np.repeat(yaw_offsets_deg, len(forward_offsets))[best]), float(np.tile(forward_offsets,
                                                                                       len(yaw_offsets_deg))[best])


def camera_following_error(clip: SyntheticClip, generated, frames) -> dict[str, np.ndarray]:
    """Absolute yaw error (degrees) and forward error (metres) of generated frames (F, H, W, 3) at the given frame
    indices, each (len(frames),)."""
    generated = np.asarray(generated)
    if generated.shape[1:3] != (clip.height, clip.width):
        raise ValueError(f"generated frames are {generated.shape[1:3]}, the clip is {(clip.height, clip.width)}")
    offsets = np.array([recover_offsets(clip, generated[index], index) for index in frames]).reshape(-1, 2)
    return {"yaw_deg": np.abs(offsets[:, 0]), "forward_m": np.abs(offsets[:, 1])}


def grid_resolution() -> tuple[float, float]:
    """(yaw step in degrees, forward step in metres) of the candidate grid: the finest error it can tell apart."""
    return float(YAW_OFFSETS_DEG[1] - YAW_OFFSETS_DEG[0]), round(float(FORWARD_OFFSETS_M[1] - FORWARD_OFFSETS_M[0]), 6)

