"""Camera geometry of SANA-WM: action DSL, intrinsics for the resize-and-crop, the DiT camera tensors, UCPE rays.

Conventions: camera-to-world (c2w) 4x4 poses with OpenCV axes (+x right, +y down, +z forward); intrinsics as
[fx, fy, cx, cy] in pixels; pixel centres at integer coordinates; all outputs channels-last and float32.
Host-side preparation (`action_string_to_c2w` .. `prepare_camera`) validates concrete inputs and raises ValueError;
`ucpe_ray_matrices` and `invert_se3` are pure jax.numpy and run under jit.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.frozen_config import FrozenConfig

TARGET_SIZE = (704, 1280)
VAE_STRIDE = (8, 32, 32)

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Action DSL -> camera-to-world trajectory (host side, float64 then float32)
# ---------------------------------------------------------------------------

ACTION_KEYS = "wasdijkl"
# Components of the per-frame camera motion, positive towards: forward, right (strafe), right (yaw), up (pitch).
MOTION_AXES = ("forward", "strafe", "yaw", "pitch")
_ALLOWED_KEYS = "allowed keys: w s a d i k j l, or none-N"


@dataclasses.dataclass(frozen=True)
class ActionConvention(FrozenConfig):
    """How the keys of an action string move the camera, frame by frame.

    key_motion: (key, motion axis, sign) for every key of ACTION_KEYS, axes from MOTION_AXES.
    translation_speed: distance per frame at full forward / strafe speed.
    rotation_speed_deg: degrees per frame at full yaw / pitch speed.
    pitch_limit_deg: bound on |pitch|; a step that would cross it stops at the bound when `pitch_saturates`, else
        it is skipped.
    press_tau_s, coast_tau_s: time constants in seconds (at `fps`) with which each motion component eases towards
        its target while a key drives it / after release; None for both: the motion is the held keys, unsmoothed.
    """

    key_motion: tuple[tuple[str, str, int], ...]
    translation_speed: float
    rotation_speed_deg: float
    pitch_limit_deg: float
    pitch_saturates: bool
    press_tau_s: float | None = None
    coast_tau_s: float | None = None
    fps: float = 16.0

    def __post_init__(self):
        keys = sorted(key for key, _, _ in self.key_motion)
        finite = [math.isfinite(v) for v in (self.translation_speed, self.rotation_speed_deg, self.pitch_limit_deg)]
        taus = (self.press_tau_s, self.coast_tau_s)
        self.check([
            (keys == sorted(ACTION_KEYS), f"key_motion must give each of {ACTION_KEYS!r} once, got {keys}"),
            (all(axis in MOTION_AXES and sign in (-1, 1) for _, axis, sign in self.key_motion),
             f"key_motion axes must be in {MOTION_AXES} with sign +-1, got {self.key_motion}"),
            (all(finite), "speeds and the pitch limit must be finite"),
            (self.translation_speed >= 0, f"translation_speed must be >= 0, got {self.translation_speed}"),
            (self.rotation_speed_deg >= 0, f"rotation_speed_deg must be >= 0, got {self.rotation_speed_deg}"),
            (self.pitch_limit_deg > 0, f"pitch_limit_deg must be positive, got {self.pitch_limit_deg}"),
            (taus == (None, None) or (all(t is not None and t > 0 for t in taus) and self.fps > 0),
             f"press_tau_s and coast_tau_s must both be None or both positive (fps > 0), got {taus} at {self.fps}"),
        ])

    @property
    def eased(self) -> bool:
        return self.press_tau_s is not None

    def key_matrix(self) -> np.ndarray:
        """(8, 4) float64: row k is the motion (along MOTION_AXES, in units of full speed) of ACTION_KEYS[k]."""
        matrix = np.zeros((len(ACTION_KEYS), len(MOTION_AXES)))
        for key, axis, sign in self.key_motion:
            matrix[ACTION_KEYS.index(key), MOTION_AXES.index(axis)] = sign
        return matrix


ACTION_CONVENTIONS = {
    # The released NVlabs CLI after its key remap: a/d turn, j/l strafe, eased held keys, gentle speeds.
    "sana_wm": ActionConvention(
        key_motion=(("w", "forward", 1), ("s", "forward", -1), ("a", "yaw", -1), ("d", "yaw", 1),
                    ("i", "pitch", 1), ("k", "pitch", -1), ("j", "strafe", -1), ("l", "strafe", 1)),
        translation_speed=0.025, rotation_speed_deg=0.6, pitch_limit_deg=60.0, pitch_saturates=True,
        press_tau_s=0.45, coast_tau_s=1.0, fps=16.0,
    ),
    # diffusers 0.42.1 (the first release's mapping): a/d strafe, j/l turn, no smoothing.
    "diffusers": ActionConvention(
        key_motion=(("w", "forward", 1), ("s", "forward", -1), ("a", "strafe", -1), ("d", "strafe", 1),
                    ("i", "pitch", 1), ("k", "pitch", -1), ("j", "yaw", -1), ("l", "yaw", 1)),
        translation_speed=0.05, rotation_speed_deg=1.2, pitch_limit_deg=85.0, pitch_saturates=False,
    ),
}


def action_convention(name: str = "sana_wm", **overrides) -> ActionConvention:
    """The named convention of ACTION_CONVENTIONS with the fields in `overrides` that are not None replaced."""
    if name not in ACTION_CONVENTIONS:
        raise ValueError(f"unknown action convention {name!r}; choose from {', '.join(ACTION_CONVENTIONS)}")
    return ACTION_CONVENTIONS[name].replace(**{k: v for k, v in overrides.items() if v is not None})


def _held_keys_per_frame(action: str) -> np.ndarray:
    """'<keys>-<frames>,...' -> (N, 8) bool, column k True when ACTION_KEYS[k] is held in that frame.

    Whitespace is ignored, a full-width comma separates segments like ',', keys are case-insensitive and 'none'
    holds no key.
    """
    cleaned = "".join(action.replace("，", ",").split())
    if not cleaned:
        raise ValueError(f"action string is empty: give segments '<keys>-<frames>' such as w-16,aw-8; {_ALLOWED_KEYS}")
    frames = []
    for segment in cleaned.split(","):
        keys, dash, duration = segment.rpartition("-")
        if not dash or not keys:
            raise ValueError(f"action segment {segment!r} is malformed: expected '<keys>-<frames>', e.g. w-16, none-8")
        if not (duration.isascii() and duration.isdigit()) or int(duration) == 0:
            raise ValueError(f"action segment {segment!r}: frame count {duration!r} is not a positive integer")
        keys = keys.lower()
        held = "" if keys == "none" else keys
        unknown = sorted(set(held) - set(ACTION_KEYS), key=held.index)
        if unknown:
            named = ", ".join(repr(key) for key in unknown)
            plural = "s" * (len(unknown) > 1)
            raise ValueError(f"action segment {segment!r}: unknown key{plural} {named}; {_ALLOWED_KEYS}")
        frames.append(np.tile([key in held for key in ACTION_KEYS], (int(duration), 1)))
    return np.concatenate(frames)


def _motion_per_frame(held: np.ndarray, convention: ActionConvention) -> np.ndarray:
    """held (N, 8) bool -> (N, 4) float64 commanded motion along MOTION_AXES in units of full speed.

    Uneased: the held keys' directions summed. Eased: a frame in which any key goes down sets every component to
    its target at once; otherwise each component moves a fraction 1 - exp(-1 / (fps * tau)) of the way to its
    target, tau = press_tau_s where the target is non-zero and coast_tau_s where it is zero (release, or opposite
    keys held together).
    """
    targets = held.astype(np.float64) @ convention.key_matrix()
    if not convention.eased:
        return targets
    press = 1.0 - math.exp(-1.0 / (convention.fps * convention.press_tau_s))
    coast = 1.0 - math.exp(-1.0 / (convention.fps * convention.coast_tau_s))
    motion = np.empty_like(targets)
    current, previous = np.zeros(len(MOTION_AXES)), np.zeros(len(ACTION_KEYS), bool)
    for frame, (target, keys) in enumerate(zip(targets, held)):
        if np.any(keys & ~previous):
            current = target.copy()
        else:
            current = current + np.where(target != 0, press, coast) * (target - current)
        motion[frame], previous = current, keys
    return motion


def _cumulative_pitch(steps: np.ndarray, limit: float, saturate: bool) -> np.ndarray:
    """Running pitch (N,) from per-frame steps (N,) kept within [-limit, limit] by saturating or skipping a step."""
    pitch = np.empty_like(steps)
    current = 0.0
    for frame, step in enumerate(steps):
        if saturate:
            current = min(limit, max(-limit, current + step))
        elif abs(current + step) <= limit:
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
    convention: str = "sana_wm",
    translation_speed: float | None = None,
    rotation_speed_deg: float | None = None,
    pitch_limit_deg: float | None = None,
) -> np.ndarray:
    """Roll an action string out into a c2w trajectory (N+1, 4, 4) float32, N the total frame count of its segments.

    Pose 0 is the identity; pose n is the camera after the keys of frame n (1-based) acted. An action string is
    comma-separated segments '<keys>-<frames>': the keys held for that many frames, several keys at once as in
    'aw-24' (forward while turning left), 'none-N' for no key.

    Conventions (speeds and the pitch limit default to the convention's, None keeps them):
    - "sana_wm" (default), the released NVlabs CLI after its key remap: w/s forward/back along the heading, a/d
      yaw left/right, i/k pitch up/down, j/l strafe left/right; 0.025 per frame and 0.6 deg per frame at full
      speed, pitch saturating at +-60 deg. Held keys are eased: when a key goes down every motion component jumps
      to its target; otherwise each one eases towards it with a 0.45 s time constant while driven and coasts to
      rest with 1 s after release (16 fps), so 'w-40,none-40' keeps gliding forward for a while.
    - "diffusers", diffusers 0.42.1 (the first release): a/d strafe, j/l yaw, i/k pitch; 0.05 and 1.2 deg per
      frame; no easing; a pitch step that would pass +-85 deg is skipped.

    Per frame: yaw and pitch turn by (motion * rotation speed), composed as R <- rot_y(yaw) . R . rot_x(pitch) so
    R_n = rot_y(total yaw) . rot_x(total pitch); then the camera moves by (motion * translation speed) along its new
    forward and right axes projected on the horizontal (XZ) plane, so w follows the heading and never climbs.
    Invalid strings raise ValueError naming the segment (e.g. "action segment 'zz-3': unknown key 'z'; ...").
    """
    conv = action_convention(convention, translation_speed=translation_speed, rotation_speed_deg=rotation_speed_deg,
                             pitch_limit_deg=pitch_limit_deg)
    motion = _motion_per_frame(_held_keys_per_frame(action), conv)
    forward, strafe, yaw, pitch = motion.T
    step = math.radians(conv.rotation_speed_deg)
    total_pitch = _cumulative_pitch(step * pitch, math.radians(conv.pitch_limit_deg), conv.pitch_saturates)
    rotation = _rotation_y(np.cumsum(step * yaw)) @ _rotation_x(total_pitch)
    heading, right = _horizontal_unit(rotation[:, :, 2]), _horizontal_unit(rotation[:, :, 0])
    moves = forward[:, None] * heading + strafe[:, None] * right
    c2w = np.tile(np.eye(4), (len(motion) + 1, 1, 1))
    c2w[1:, :3, :3] = rotation
    c2w[1:, :3, 3] = np.cumsum(conv.translation_speed * moves, axis=0)
    return c2w.astype(np.float32)


def _key_states(motion: np.ndarray, convention: ActionConvention, held: np.ndarray | None = None):
    """Per-frame motion (N, 4) along MOTION_AXES in units of full speed -> (key_levels (N+1, 8), look (N+1, 2))
    float32, row 0 all zero for the starting pose: a key's level is the motion along its direction clipped to
    [0, 1] (1 where `held` (N, 8) says it is down), look the (yaw, pitch) motion clipped to [-1, 1]."""
    levels = np.clip(motion @ convention.key_matrix().T, 0.0, 1.0)
    if held is not None:
        levels = np.where(held, 1.0, levels)
    look = np.clip(motion[:, [MOTION_AXES.index("yaw"), MOTION_AXES.index("pitch")]], -1.0, 1.0)
    states = np.concatenate([np.zeros((1, len(ACTION_KEYS) + 2)), np.concatenate([levels, look], axis=1)])
    states = states.astype(np.float32)
    return states[:, : len(ACTION_KEYS)], states[:, len(ACTION_KEYS) :]


def action_key_states(action: str, *, convention: str = "sana_wm") -> tuple[np.ndarray, np.ndarray]:
    """What drives the camera into each pose of `action_string_to_c2w(action)`, for drawing on the video.

    Returns:
        key_levels (N+1, 8) float32 in [0, 1], column k for ACTION_KEYS[k]: 1 while the key is held, and after its
            release the eased motion it left behind along its direction (sana_wm coasting; 0 at once without
            easing). Row 0 (the first pose) is all zero; row n belongs to the keys of frame n.
        look (N+1, 2) float32 in [-1, 1]: commanded (yaw right, pitch up) as fractions of the rotation speed.
    """
    conv = action_convention(convention)
    held = _held_keys_per_frame(action)
    return _key_states(_motion_per_frame(held, conv), conv, held)


def c2w_key_states(
    c2w,
    *,
    convention: str = "sana_wm",
    translation_speed: float | None = None,
    rotation_speed_deg: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The key states of `action_key_states` read back from a trajectory (F, 4, 4), for paths given as poses.

    Each frame's move relative to the first pose is split like the roll-out's: forward and strafe along the
    horizontal heading and right axes in units of `translation_speed`, yaw and pitch of the heading in units of
    `rotation_speed_deg` (None: the convention's). A key's level is that motion along its direction, clipped to
    [0, 1]; a pose path that moves faster than those speeds saturates. Returns (key_levels (F, 8), look (F, 2)).
    """
    conv = action_convention(convention, translation_speed=translation_speed, rotation_speed_deg=rotation_speed_deg)
    if conv.translation_speed <= 0 or conv.rotation_speed_deg <= 0:
        raise ValueError("reading key states from poses needs positive translation and rotation speeds")
    poses = _validated_poses(c2w).astype(np.float64)
    relative = np.linalg.inv(poses[0]) @ poses
    rotation, position = relative[:, :3, :3], relative[:, :3, 3]
    forward_axis = rotation[:, :, 2]  # R = rot_y(yaw) . rot_x(pitch) -> (cos p sin y, -sin p, cos p cos y)
    yaw = np.unwrap(np.arctan2(forward_axis[:, 0], forward_axis[:, 2]))
    pitch = np.arctan2(-forward_axis[:, 1], np.hypot(forward_axis[:, 0], forward_axis[:, 2]))
    moves = np.diff(position, axis=0)
    heading, right = _horizontal_unit(forward_axis[1:]), _horizontal_unit(rotation[1:, :, 0])
    step = math.radians(conv.rotation_speed_deg)
    motion = np.stack([
        np.sum(moves * heading, axis=-1) / conv.translation_speed,
        np.sum(moves * right, axis=-1) / conv.translation_speed,
        np.diff(yaw) / step,
        np.diff(pitch) / step,
    ], axis=-1)
    return _key_states(motion, conv)


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
    translation = -_apply(world_to_ray_rotation, camera_centre)
    # Identity for NaN rays, chosen on the parts: the matrices are then a concatenation, which XLA materialises
    # once, where a final select was fused into (and evaluated by) every head and channel of the UCPE transforms.
    has_nan = jnp.isnan(directions).any(axis=-1)[..., None]
    world_to_ray = _se3(jnp.where(has_nan[..., None], jnp.eye(3, dtype=jnp.float32), world_to_ray_rotation),
                        jnp.where(has_nan, 0.0, translation))
    return world_to_ray.reshape(batch, frames * height * width, 4, 4)
