"""Camera geometry of SANA-WM: action DSL, intrinsics for the resize-and-crop, the DiT camera tensors, UCPE rays.

Conventions: camera-to-world (c2w) 4x4 poses with OpenCV axes (+x right, +y down, +z forward); intrinsics as
[fx, fy, cx, cy] in pixels; pixel centres at integer coordinates; all outputs channels-last and float32.
Host-side preparation (`action_string_to_c2w` .. `prepare_camera`) validates concrete inputs and raises ValueError;
`ucpe_ray_matrices` and `invert_se3` are pure jax.numpy and run under jit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

TARGET_SIZE = (704, 1280)
VAE_STRIDE = (8, 32, 32)

ACTION_KEYS = "wasdijkl"
DEFAULT_TRANSLATION_SPEED = 0.05
DEFAULT_ROTATION_SPEED_DEG = 1.2
DEFAULT_PITCH_LIMIT_DEG = 85.0

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Action DSL -> camera-to-world trajectory (host side, float64 then float32)
# ---------------------------------------------------------------------------


def _held_keys_per_frame(action: str) -> np.ndarray:
    """'<keys>-<frames>,...' -> (N, 8) bool, column k True when ACTION_KEYS[k] is held in that frame.

    Whitespace is ignored, a full-width comma separates segments like ',', keys are case-insensitive and 'none'
    holds still.
    """
    cleaned = "".join(action.replace("，", ",").split())
    if not cleaned:
        raise ValueError("action string is empty")
    frames = []
    for segment in cleaned.split(","):
        keys, dash, duration = segment.partition("-")
        if not dash or not keys:
            raise ValueError(f"malformed action segment {segment!r}: expected '<keys>-<frames>', e.g. 'w-16', 'none-8'")
        if not (duration.isascii() and duration.isdigit()) or int(duration) == 0:
            raise ValueError(f"action segment {segment!r}: duration {duration!r} is not a positive integer")
        keys = keys.lower()
        held = "" if keys == "none" else keys
        unknown = sorted(set(held) - set(ACTION_KEYS))
        if unknown:
            raise ValueError(f"action segment {segment!r}: unknown keys {unknown}; allowed: {ACTION_KEYS} or 'none'")
        frames.append(np.tile([key in held for key in ACTION_KEYS], (int(duration), 1)))
    return np.concatenate(frames)


def _clamped_cumulative_pitch(steps: np.ndarray, limit: float) -> np.ndarray:
    """Running pitch (N,) from per-frame steps (N,); a step that would leave [-limit, limit] is dropped."""
    pitch = np.empty_like(steps)
    current = 0.0
    for frame, step in enumerate(steps):
        if abs(current + step) <= limit:
            current += step
        pitch[frame] = current
    return pitch


def _rotation_x(angle: np.ndarray) -> np.ndarray:
    """(N,) radians -> (N, 3, 3) rotations about +x."""
    cos, sin, one, zero = np.cos(angle), np.sin(angle), np.ones_like(angle), np.zeros_like(angle)
    rows = [[one, zero, zero], [zero, cos, -sin], [zero, sin, cos]]
    return np.stack([np.stack(row, -1) for row in rows], -2)


def _rotation_y(angle: np.ndarray) -> np.ndarray:
    """(N,) radians -> (N, 3, 3) rotations about +y."""
    cos, sin, one, zero = np.cos(angle), np.sin(angle), np.ones_like(angle), np.zeros_like(angle)
    rows = [[cos, zero, sin], [zero, one, zero], [-sin, zero, cos]]
    return np.stack([np.stack(row, -1) for row in rows], -2)


def _horizontal_unit(vectors: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N, 3): y component zeroed, then normalised where the result is non-zero."""
    flat = vectors * np.array([1.0, 0.0, 1.0])
    norm = np.linalg.norm(flat, axis=-1, keepdims=True)
    return np.where(norm > 0, flat / np.where(norm > 0, norm, 1.0), flat)


def action_string_to_c2w(
    action: str,
    *,
    translation_speed: float = DEFAULT_TRANSLATION_SPEED,
    rotation_speed_deg: float = DEFAULT_ROTATION_SPEED_DEG,
    pitch_limit_deg: float = DEFAULT_PITCH_LIMIT_DEG,
) -> np.ndarray:
    """Roll an action string out into a c2w trajectory (N+1, 4, 4) float32 starting at the identity.

    Per frame: w/s move forward/back and d/a right/left along the camera axes projected on the horizontal (XZ)
    plane; i/k pitch up/down, l/j yaw right/left by `rotation_speed_deg`. Rotations compose as
    R <- rot_y(yaw) . R . rot_x(pitch), so R_n = rot_y(total yaw) . rot_x(total pitch). A pitch step that would
    pass +-pitch_limit_deg is skipped. Keys, speeds and limit are those of diffusers 0.42.1 (no velocity smoothing).
    """
    held = _held_keys_per_frame(action).astype(np.float64)
    key = {name: held[:, column] for column, name in enumerate(ACTION_KEYS)}
    step = math.radians(rotation_speed_deg)
    pitch = _clamped_cumulative_pitch(step * (key["i"] - key["k"]), math.radians(pitch_limit_deg))
    yaw = np.cumsum(step * (key["l"] - key["j"]))
    rotation = _rotation_y(yaw) @ _rotation_x(pitch)
    forward = _horizontal_unit(rotation[:, :, 2]) * (translation_speed * (key["w"] - key["s"]))[:, None]
    right = _horizontal_unit(rotation[:, :, 0]) * (translation_speed * (key["d"] - key["a"]))[:, None]
    c2w = np.tile(np.eye(4), (len(held) + 1, 1, 1))
    c2w[1:, :3, :3] = rotation
    c2w[1:, :3, 3] = np.cumsum(forward + right, axis=0)
    return c2w.astype(np.float32)


def snap_num_frames(n: int, stride: int = 8, upper_bound: int | None = None) -> int:
    """Nearest frame count of the form stride*k + 1 (ties round up), not above `upper_bound`; at least 1."""
    if stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    if n < 1:
        return 1
    below = n - (n - 1) % stride
    if below == n:
        return n
    above = below + stride
    snapped = below if n - below < above - n else above
    if upper_bound is not None and snapped > upper_bound:
        snapped = below
    return snapped


# ---------------------------------------------------------------------------
# Intrinsics (host side)
# ---------------------------------------------------------------------------


def _check_intrinsics(intrinsics: np.ndarray) -> np.ndarray:
    """(..., 4) [fx, fy, cx, cy]: finite with positive focal lengths, else ValueError."""
    if not np.all(np.isfinite(intrinsics)):
        raise ValueError("intrinsics contain NaN or infinite values")
    if np.any(intrinsics[..., :2] <= 0):
        raise ValueError(f"focal lengths fx, fy must be positive, got min {intrinsics[..., :2].min()}")
    return intrinsics


def intrinsics_per_frame(intrinsics, num_frames: int) -> np.ndarray:
    """Intrinsics as (3, 3) K, (F', 3, 3), (4,) or (F', 4) [fx, fy, cx, cy] -> (num_frames, 4) float32.

    A single camera is repeated over all frames; a per-frame array with F' >= num_frames is truncated to the first
    num_frames (fewer frames are an error, as in the diffusers pipeline).
    """
    given = np.asarray(intrinsics, dtype=np.float32)
    vec4 = given
    if given.shape[-2:] == (3, 3) and given.ndim in (2, 3):
        vec4 = np.stack([given[..., 0, 0], given[..., 1, 1], given[..., 0, 2], given[..., 1, 2]], axis=-1)
    if vec4.shape == (4,):
        vec4 = np.broadcast_to(vec4, (num_frames, 4))
    if vec4.ndim != 2 or vec4.shape[1] != 4 or vec4.shape[0] < num_frames:
        raise ValueError(
            f"intrinsics must have shape (4,), (F, 4), (3, 3) or (F, 3, 3) with F >= {num_frames} frames; "
            f"got {given.shape}"
        )
    return _check_intrinsics(np.array(vec4[:num_frames]))


def center_crop_geometry(
    source_size: tuple[int, int], target_size: tuple[int, int] = TARGET_SIZE
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(height, width) of a source image -> ((resized_h, resized_w), (crop_top, crop_left)).

    The image is resized, aspect preserved, to cover `target_size`, then center-cropped to it.
    """
    (source_h, source_w), (target_h, target_w) = source_size, target_size
    if min(source_h, source_w, target_h, target_w) <= 0:
        raise ValueError(f"image sizes must be positive, got source {source_size} and target {target_size}")
    scale = max(target_h / source_h, target_w / source_w)
    resized_h = max(target_h, int(round(source_h * scale)))
    resized_w = max(target_w, int(round(source_w * scale)))
    return (resized_h, resized_w), ((resized_h - target_h) // 2, (resized_w - target_w) // 2)


def resize_crop_intrinsics(
    intrinsics, source_size: tuple[int, int], target_size: tuple[int, int] = TARGET_SIZE
) -> np.ndarray:
    """(..., 4) [fx, fy, cx, cy] in source-image pixels -> the same in pixels of the resized and cropped image."""
    vec4 = np.asarray(intrinsics, dtype=np.float32)
    if vec4.ndim == 0 or vec4.shape[-1] != 4:
        raise ValueError(f"intrinsics must have shape (..., 4) [fx, fy, cx, cy], got {vec4.shape}")
    _check_intrinsics(vec4)
    (resized_h, resized_w), (crop_top, crop_left) = center_crop_geometry(source_size, target_size)
    scale_x, scale_y = resized_w / source_size[1], resized_h / source_size[0]
    scale = np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    offset = np.array([0.0, 0.0, crop_left, crop_top], dtype=np.float32)
    return vec4 * scale - offset


# ---------------------------------------------------------------------------
# Shared ray geometry (jax.numpy)
# ---------------------------------------------------------------------------


def _se3(rotation: jnp.ndarray, translation: jnp.ndarray) -> jnp.ndarray:
    """rotation (..., 3, 3), translation (..., 3) -> (..., 4, 4) with bottom row [0, 0, 0, 1]."""
    top = jnp.concatenate([rotation, translation[..., None]], axis=-1)
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], top.dtype), top.shape[:-2] + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)


def _apply(matrix: jnp.ndarray, vectors: jnp.ndarray) -> jnp.ndarray:
    """matrix (..., 3, 3) times vectors (..., 3) with broadcasting, full float32 precision."""
    return jnp.einsum("...ij,...j->...i", matrix, vectors, precision=_HIGHEST)


def _normalize(vectors: jnp.ndarray) -> jnp.ndarray:
    """v / max(|v|, 1e-6) along the last axis, with a finite gradient at v = 0."""
    return vectors * jax.lax.rsqrt(jnp.maximum(jnp.sum(vectors * vectors, axis=-1, keepdims=True), 1e-12))


def _pinhole_rays(intrinsics: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """(..., 4) [fx, fy, cx, cy] -> (..., H, W, 3) unit camera-frame rays through integer pixel coordinates."""
    fx, fy, cx, cy = (intrinsics[..., k, None, None] for k in range(4))
    x = (jnp.arange(width, dtype=intrinsics.dtype) - cx) / fx
    y = (jnp.arange(height, dtype=intrinsics.dtype)[:, None] - cy) / fy
    x, y = jnp.broadcast_arrays(x, y)
    rays = jnp.stack([x, y, jnp.ones_like(x)], axis=-1)
    return rays * jax.lax.rsqrt(1.0 + x * x + y * y)[..., None]


def _world_rays(c2w: jnp.ndarray, intrinsics: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """c2w (..., 4, 4), intrinsics (..., 4) -> (..., H, W, 3) ray directions in world axes (not renormalised)."""
    return _apply(c2w[..., None, None, :3, :3], _pinhole_rays(intrinsics, height, width))


def invert_se3(transforms: jnp.ndarray) -> jnp.ndarray:
    """Closed-form inverse of rigid transforms (..., 4, 4): [R t; 0 1] -> [R^T  -R^T t; 0 1]."""
    if transforms.shape[-2:] != (4, 4):
        raise ValueError(f"transforms must have shape (..., 4, 4), got {transforms.shape}")
    rotation_t = jnp.swapaxes(transforms[..., :3, :3], -1, -2)
    return _se3(rotation_t, -_apply(rotation_t, transforms[..., :3, 3]))


# ---------------------------------------------------------------------------
# DiT camera tensors: camera_conditions and chunk_plucker (host-side validation, jax.numpy compute)
# ---------------------------------------------------------------------------


def _validated_poses(c2w) -> np.ndarray:
    """c2w -> (F, 4, 4) float32 numpy, ValueError unless F >= 1 and every value is finite."""
    poses = np.asarray(c2w, dtype=np.float32)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or poses.shape[0] == 0:
        raise ValueError(f"c2w must have shape (F, 4, 4) with F >= 1, got {poses.shape}")
    if not np.all(np.isfinite(poses)):
        raise ValueError("c2w contains NaN or infinite values")
    return poses


@jax.jit
def _relative_to_first(c2w: jnp.ndarray) -> jnp.ndarray:
    """(F, 4, 4) -> (F, 4, 4): P0^-1 . Pk, frame 0 exactly the identity."""
    relative = jnp.matmul(invert_se3(c2w[0]), c2w[1:], precision=_HIGHEST)
    return jnp.concatenate([jnp.eye(4, dtype=c2w.dtype)[None], relative])


def relative_poses(c2w) -> jnp.ndarray:
    """c2w (F, 4, 4) -> (F, 4, 4) float32 poses relative to frame 0: P0^-1 . Pk, frame 0 exactly the identity."""
    return _relative_to_first(jnp.asarray(_validated_poses(c2w)))


def _plucker_rays(c2w: jnp.ndarray, intrinsics: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """c2w (..., 4, 4), intrinsics (..., 4) -> (..., H, W, 6) Plücker rays: unit world direction d, moment o x d."""
    directions = _normalize(_world_rays(c2w, intrinsics, height, width))
    origins = jnp.broadcast_to(c2w[..., None, None, :3, 3], directions.shape)
    return jnp.concatenate([directions, jnp.cross(origins, directions)], axis=-1)


def _plucker_window_frames(num_latent_frames: int, time_stride: int, num_frames: int) -> np.ndarray:
    """(T, stride) pixel-frame indices of each latent frame's Plücker window.

    Latent frame i covers frames max(0, stride*i - stride + 1) onwards (frame 0: 0..stride-1, frame i >= 1:
    stride*i - stride + 1 .. stride*i); indices past the last frame repeat the last frame.
    """
    # Latent frame 0 sees frames 0..stride-1 although its camera_conditions row is frame 0: kept, the released
    # checkpoint was trained with these windows.
    starts = np.maximum(0, time_stride * np.arange(num_latent_frames) - (time_stride - 1))
    return np.minimum(starts[:, None] + np.arange(time_stride), num_frames - 1)


@functools.partial(jax.jit, static_argnames=("latent_size", "time_stride"))
def _camera_tensors(
    c2w: jnp.ndarray, latent_intrinsics: jnp.ndarray, latent_size: tuple[int, int], time_stride: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """c2w (F, 4, 4), latent-grid intrinsics (F, 4) -> camera_conditions (T, 20), chunk_plucker (T, H, W, 6*stride)."""
    num_frames = c2w.shape[0]
    latent_h, latent_w = latent_size
    num_latent_frames = (num_frames - 1) // time_stride + 1
    poses = _relative_to_first(c2w)
    anchors = time_stride * np.arange(num_latent_frames)
    camera_conditions = jnp.concatenate(
        [poses[anchors].reshape(num_latent_frames, 16), latent_intrinsics[anchors]], axis=-1
    )
    windows = _plucker_window_frames(num_latent_frames, time_stride, num_frames)
    plucker = _plucker_rays(poses[windows], latent_intrinsics[windows], latent_h, latent_w)  # (T, stride, H, W, 6)
    chunk_plucker = plucker.transpose(0, 2, 3, 1, 4).reshape(num_latent_frames, latent_h, latent_w, 6 * time_stride)
    return camera_conditions, chunk_plucker


def prepare_camera(
    c2w,
    intrinsics,
    target_size: tuple[int, int] = TARGET_SIZE,
    vae_stride: tuple[int, int, int] = VAE_STRIDE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Camera tensors of the DiT for one video.

    Args:
        c2w: (F, 4, 4) camera-to-world poses, F = stride_t*k + 1.
        intrinsics: (F, 4) [fx, fy, cx, cy] in pixels of the target image.
        target_size: (height, width) of the video, divisible by the spatial VAE strides.
        vae_stride: (temporal, height, width) VAE compression.

    Returns:
        camera_conditions (T, 20): row-major pose relative to frame 0 (16) and latent-grid intrinsics (4) of pixel
            frame stride_t*i.
        chunk_plucker (T, H, W, 6*stride_t): Plücker rays of latent frame i's window of stride_t pixel frames at
            latent resolution, channels frame-major (channel 6*j + c is component c of the window's j-th frame).
        with T = (F-1)//stride_t + 1, H = height/stride_h, W = width/stride_w.
    """
    time_stride, height_stride, width_stride = vae_stride
    height, width = target_size
    if height % height_stride or width % width_stride:
        raise ValueError(f"target_size {target_size} is not divisible by the spatial VAE stride {vae_stride[1:]}")
    poses = _validated_poses(c2w)
    num_frames = poses.shape[0]
    if (num_frames - 1) % time_stride:
        raise ValueError(
            f"c2w has {num_frames} frames; the VAE needs {time_stride}k+1 (snap_num_frames gives the nearest count)"
        )
    vec4 = np.asarray(intrinsics, dtype=np.float32)
    if vec4.shape != (num_frames, 4):
        raise ValueError(f"intrinsics must have shape ({num_frames}, 4) [fx, fy, cx, cy], got {vec4.shape}")
    _check_intrinsics(vec4)
    latent_h, latent_w = height // height_stride, width // width_stride
    to_latent = np.array([latent_w / width, latent_h / height, latent_w / width, latent_h / height], np.float32)
    return _camera_tensors(jnp.asarray(poses), jnp.asarray(vec4 * to_latent), (latent_h, latent_w), time_stride)


# ---------------------------------------------------------------------------
# UCPE ray transforms inside the DiT (jittable)
# ---------------------------------------------------------------------------


def ucpe_ray_matrices(
    camera_conditions: jnp.ndarray, grid: tuple[int, int, int], patch_size: tuple[int, int, int] = (1, 1, 1)
) -> jnp.ndarray:
    """Per-token world -> ray-frame transforms P (B, T*H*W, 4, 4), tokens ordered (t, h, w).

    camera_conditions (B, T, 20) holds each frame's c2w (row-major 16) and [fx, fy, cx, cy] on the latent grid;
    grid (T, H, W) is the token grid, one token per patch_size patch of the latent. The ray through token (h, w)
    (integer pixel centres; intrinsics divided by the patch size) has world direction z; the ray frame has axes
    x = normalize(cam_y x z), y = normalize(z x x), z and origin at the camera centre. Rays with NaN directions get
    the identity.
    """
    frames, height, width = grid
    conditions = jnp.asarray(camera_conditions, jnp.float32)
    if conditions.ndim != 3 or conditions.shape[1:] != (frames, 20):
        raise ValueError(f"camera_conditions must have shape (B, {frames}, 20) for grid {grid}, got {conditions.shape}")
    batch = conditions.shape[0]
    c2w = conditions[..., :16].reshape(batch, frames, 4, 4)
    # diffusers maps fx to a FoV over the patch-scaled width and back over the token width (xi = 0): for positive
    # focal lengths that round trip is fx / patch up to float32 rounding.
    patch_w, patch_h = patch_size[2], patch_size[1]
    intrinsics = conditions[..., 16:] / jnp.array([patch_w, patch_h, patch_w, patch_h], jnp.float32)

    directions = _world_rays(c2w, intrinsics, height, width)  # (B, T, H, W, 3)
    ray_z = _normalize(directions)
    ray_x = _normalize(jnp.cross(c2w[:, :, None, None, :3, 1], ray_z))
    ray_y = _normalize(jnp.cross(ray_z, ray_x))
    world_to_ray_rotation = jnp.stack([ray_x, ray_y, ray_z], axis=-2)
    camera_centre = c2w[:, :, None, None, :3, 3]
    world_to_ray = _se3(world_to_ray_rotation, -_apply(world_to_ray_rotation, camera_centre))
    has_nan = jnp.isnan(directions).any(axis=-1)[..., None, None]
    world_to_ray = jnp.where(has_nan, jnp.eye(4, dtype=jnp.float32), world_to_ray)
    return world_to_ray.reshape(batch, frames * height * width, 4, 4)
