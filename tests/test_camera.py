"""sanawm_jax.camera against the diffusers SANA-WM oracle (cam_utils, the pipeline and the transformer's UCPE rays).

Tolerances: the action DSL is float64 internally and differs from the oracle only in the last float32 bit, so 1e-6
absolute on unit-scale poses (the diffusers convention is checked against the oracle, the default sana_wm convention
against expectations derived here by hand); everything else runs in float32 on both sides with differently ordered arithmetic
(closed-form vs BLAS matmuls, rsqrt vs sqrt-divide, the oracle's fx -> FoV -> fx round trip), so 1e-5 absolute on
unit-scale directions, moments and matrices.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.transformers import transformer_sana_wm as oracle_transformer
from diffusers.pipelines.sana_wm import cam_utils as oracle_cam
from diffusers.pipelines.sana_wm.pipeline_sana_wm import SanaWMPipeline

from sanawm_jax import camera

FLOAT32_ATOL = 1e-5
# Jitted as inside the model: eager dispatch would compile each of its ops separately for every new shape.
ray_matrices = jax.jit(camera.ucpe_ray_matrices, static_argnums=(1, 2))
ACTIONS = ["w-40,jw-24,l-16", "none-8,i-10,k-10,a-9,d-9,s-16", "I-90, wd-30，k-200,sa-10,lwdaw-20"]


def random_rotations(rng, shape):
    """Uniform random rotations (*shape, 3, 3) from unit quaternions."""
    w, x, y, z = np.moveaxis(rng.normal(size=(*shape, 4)), -1, 0)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, -1) for row in rows], -2)


def rotation_from_axis_angle(vector):
    """(..., 3) axis * angle -> (..., 3, 3) via Rodrigues."""
    angle = np.linalg.norm(vector, axis=-1, keepdims=True)[..., None]
    kx, ky, kz = np.moveaxis(vector / np.maximum(np.linalg.norm(vector, axis=-1, keepdims=True), 1e-12), -1, 0)
    zero = np.zeros_like(kx)
    k = np.stack([np.stack([zero, -kz, ky], -1), np.stack([kz, zero, -kx], -1), np.stack([-ky, kx, zero], -1)], -2)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def smooth_trajectory(rng, num_frames):
    """(F, 4, 4) float32 c2w: a random start pose, then smoothly varying small rotations and translations."""
    angular_velocity = np.cumsum(rng.normal(scale=0.01, size=(num_frames, 3)), axis=0)
    rotation = random_rotations(rng, ())
    poses = []
    for step in rotation_from_axis_angle(angular_velocity):
        rotation = rotation @ step
        poses.append(rotation)
    c2w = np.tile(np.eye(4), (num_frames, 1, 1))
    c2w[:, :3, :3] = np.stack(poses)
    c2w[:, :3, 3] = rng.normal(size=3) + np.cumsum(np.cumsum(rng.normal(scale=0.02, size=(num_frames, 3)), 0), 0)
    return c2w.astype(np.float32)


def varying_intrinsics(rng, num_frames, size):
    """(F, 4) [fx, fy, cx, cy] with fx != fy, off-centre principal point, slowly drifting over frames."""
    height, width = size
    base = np.array([0.9 * width, 0.75 * width, 0.45 * width, 0.58 * height])
    drift = np.linspace(0.0, 1.0, num_frames)[:, None] * rng.uniform(-0.05, 0.05, size=4) * base
    return (base + drift).astype(np.float32)


def oracle_prepare_camera(c2w, intrinsics, target_size, vae_stride):
    """diffusers prepare_camera -> (camera_conditions (T, 20), chunk_plucker moved to (T, H, W, 48))."""
    packed = oracle_cam.prepare_camera(c2w, intrinsics, target_size=target_size, vae_stride=vae_stride)
    return packed["raymap"].numpy(), packed["chunk_plucker"].permute(1, 2, 3, 0).numpy()


def random_camera_conditions(rng, batch, frames, grid_hw):
    """(B, T, 20) float32: random c2w poses plus fx != fy and off-centre cx, cy on a (H, W) latent grid."""
    height, width = grid_hw
    c2w = np.tile(np.eye(4), (batch, frames, 1, 1))
    c2w[..., :3, :3] = random_rotations(rng, (batch, frames))
    c2w[..., :3, 3] = rng.normal(size=(batch, frames, 3))
    intrinsics = np.stack(
        [
            rng.uniform(0.6, 1.4, (batch, frames)) * width,
            rng.uniform(0.6, 1.4, (batch, frames)) * width,
            rng.uniform(0.3, 0.7, (batch, frames)) * width,
            rng.uniform(0.3, 0.7, (batch, frames)) * height,
        ],
        axis=-1,
    )
    return np.concatenate([c2w.reshape(batch, frames, 16), intrinsics], axis=-1).astype(np.float32)


def oracle_ray_matrices(camera_conditions, grid, patch_size):
    batch = camera_conditions.shape[0]
    raymats, _ = oracle_transformer._process_camera_conditions_ucpe(
        torch.from_numpy(camera_conditions), batch, grid, patch_size
    )
    return raymats.reshape(batch, -1, 4, 4).numpy()


# --- action DSL and frame counts ---


@pytest.mark.parametrize("action", ACTIONS)
def test_diffusers_convention_matches_diffusers(action):
    expected = oracle_cam.action_string_to_c2w(action)
    trajectory = camera.action_string_to_c2w(action, convention="diffusers")
    assert trajectory.shape == expected.shape and trajectory.dtype == np.float32
    np.testing.assert_allclose(trajectory, expected, rtol=0, atol=1e-6)


def test_diffusers_convention_with_custom_speeds_matches_diffusers():
    speeds = dict(translation_speed=0.025, rotation_speed_deg=0.6, pitch_limit_deg=60.0)
    action = "i-120,wl-40,k-250,ds-16"
    np.testing.assert_allclose(
        camera.action_string_to_c2w(action, convention="diffusers", **speeds),
        oracle_cam.action_string_to_c2w(action, **speeds),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "action, message",
    [
        ("w-40,zz-3", "action segment 'zz-3': unknown key 'z'; allowed keys: w s a d i k j l, or none-N"),
        ("wqx-4", "action segment 'wqx-4': unknown keys 'q', 'x'; allowed keys: w s a d i k j l, or none-N"),
        ("w--3", "action segment 'w--3': unknown key '-'; allowed keys: w s a d i k j l, or none-N"),
        ("", "action string is empty: give segments '<keys>-<frames>' such as w-16,aw-8; allowed keys: w s a d "
             "i k j l, or none-N"),
        (" \t ", "action string is empty"),
        ("w-0", "action segment 'w-0': frame count '0' is not a positive integer"),
        ("w-2.5", "action segment 'w-2.5': frame count '2.5' is not a positive integer"),
        ("w-", "action segment 'w-': frame count '' is not a positive integer"),
        ("w4", "action segment 'w4' is malformed: expected '<keys>-<frames>', e.g. w-16, none-8"),
        ("-4", "action segment '-4' is malformed"),
        ("w-4,", "action segment '' is malformed"),
    ],
)
@pytest.mark.parametrize("convention", ["sana_wm", "diffusers"])
def test_action_string_rejects_bad_input_naming_the_segment(action, message, convention):
    with pytest.raises(ValueError) as error:
        camera.action_string_to_c2w(action, convention=convention)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# The released convention, from its documentation: 0.025 per frame, 0.6 deg per frame, pitch within +-60 deg; at
# 16 fps a released component keeps exp(-1/16) of its speed per frame (1 s coast), a driven one closes
# 1 - exp(-1/(16 * 0.45)) of its gap (0.45 s press) unless a key went down this frame (then it jumps).
SPEED, TURN, PITCH_LIMIT = 0.025, np.radians(0.6), np.radians(60.0)
COAST, PRESS = np.exp(-1 / 16), np.exp(-1 / (16 * 0.45))
POSE_ATOL = 1e-6  # float64 roll-out rounded to float32, unit-scale poses


def heading(c2w):
    """Camera forward axes (F, 3) in world coordinates (OpenCV: +x right, +y down)."""
    return c2w[:, :3, 2]


def test_sana_wm_rolls_out_one_pose_per_frame_after_the_identity():
    c2w = camera.action_string_to_c2w("w-3,none-4,aw-5")
    assert c2w.shape == (13, 4, 4) and c2w.dtype == np.float32
    np.testing.assert_array_equal(c2w[0], np.eye(4))
    np.testing.assert_array_equal(c2w[:, 3], np.tile([0, 0, 0, 1], (13, 1)))


@pytest.mark.parametrize("action, direction", [("w-20", 1.0), ("s-20", -1.0)])
def test_w_and_s_move_along_the_heading_by_the_speed_each_frame(action, direction):
    c2w = camera.action_string_to_c2w(action)
    expected = direction * SPEED * np.arange(21)[:, None] * np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(c2w[:, :3, 3], expected, atol=POSE_ATOL)
    np.testing.assert_allclose(c2w[:, :3, :3], np.tile(np.eye(3), (21, 1, 1)), atol=POSE_ATOL)


def test_a_released_key_coasts_to_rest_geometrically():
    z = camera.action_string_to_c2w("w-10,none-30")[:, 2, 3]
    steps = np.diff(z.astype(np.float64))
    expected = SPEED * np.concatenate([np.ones(10), COAST ** np.arange(1, 31)])
    np.testing.assert_allclose(steps, expected, atol=POSE_ATOL)
    assert np.all(np.diff(steps[10:]) < 0) and np.all(steps > 0)  # easing is monotone, never reverses


def test_a_key_freed_from_its_opposite_eases_in_with_the_press_time_constant():
    # 'ws' cancels (velocity 0); dropping 's' presses nothing new, so forward eases towards full speed.
    z = camera.action_string_to_c2w("ws-5,w-20")[:, 2, 3]
    steps = np.diff(z.astype(np.float64))
    np.testing.assert_allclose(steps[:5], 0.0, atol=POSE_ATOL)
    np.testing.assert_allclose(steps[5:], SPEED * (1 - PRESS ** np.arange(1, 21)), atol=POSE_ATOL)
    assert np.all(np.diff(steps[5:]) > 0)


@pytest.mark.parametrize("action, sign", [("d-10", 1.0), ("a-10", -1.0)])
def test_d_turns_right_and_a_turns_left_in_place(action, sign):
    c2w = camera.action_string_to_c2w(action)
    angle = sign * 10 * TURN
    np.testing.assert_allclose(heading(c2w)[-1], [np.sin(angle), 0.0, np.cos(angle)], atol=POSE_ATOL)
    np.testing.assert_allclose(c2w[:, :3, 3], 0.0, atol=POSE_ATOL)


@pytest.mark.parametrize("action, sign", [("l-8", 1.0), ("j-8", -1.0)])
def test_l_strafes_right_and_j_left_without_turning(action, sign):
    c2w = camera.action_string_to_c2w(action)
    np.testing.assert_allclose(c2w[-1, :3, 3], [sign * 8 * SPEED, 0.0, 0.0], atol=POSE_ATOL)
    np.testing.assert_allclose(c2w[-1, :3, :3], np.eye(3), atol=POSE_ATOL)


@pytest.mark.parametrize("action, sign", [("i-10", 1.0), ("k-10", -1.0)])
def test_i_looks_up_and_k_looks_down(action, sign):
    angle = sign * 10 * TURN  # +y is down, so looking up tilts the heading towards -y
    np.testing.assert_allclose(heading(camera.action_string_to_c2w(action))[-1], [0.0, -np.sin(angle), np.cos(angle)],
                               atol=POSE_ATOL)


def test_pitch_saturates_at_the_limit_instead_of_skipping_the_step():
    # 0.7 deg steps do not divide 60 deg: saturation stops at exactly 60, skipping would stop at 59.5.
    c2w = camera.action_string_to_c2w("i-100,k-10", rotation_speed_deg=0.7)
    np.testing.assert_allclose(heading(c2w)[100], [0.0, -np.sin(PITCH_LIMIT), np.cos(PITCH_LIMIT)], atol=POSE_ATOL)
    back = PITCH_LIMIT - 10 * np.radians(0.7)
    np.testing.assert_allclose(heading(c2w)[110], [0.0, -np.sin(back), np.cos(back)], atol=POSE_ATOL)


def test_translation_follows_the_heading_on_the_horizontal_plane():
    # Pressing w stops the turn at once (a new key snaps every component to its target), so the walk is straight.
    yawed = camera.action_string_to_c2w("d-50,w-20")
    angle = 50 * TURN
    np.testing.assert_allclose(yawed[-1, :3, 3], 20 * SPEED * np.array([np.sin(angle), 0.0, np.cos(angle)]),
                               atol=POSE_ATOL)
    pitched = camera.action_string_to_c2w("i-20,w-10")
    np.testing.assert_allclose(pitched[-1, :3, 3], [0.0, 0.0, 10 * SPEED], atol=POSE_ATOL)


def test_combined_keys_act_together():
    c2w = camera.action_string_to_c2w("jw-24")
    np.testing.assert_allclose(c2w[-1, :3, 3], 24 * SPEED * np.array([-1.0, 0.0, 1.0]), atol=POSE_ATOL)
    np.testing.assert_allclose(c2w[-1, :3, :3], np.eye(3), atol=POSE_ATOL)


def test_none_holds_the_camera_still_from_rest():
    c2w = camera.action_string_to_c2w("none-8,w-2")
    np.testing.assert_array_equal(c2w[:9], np.tile(np.eye(4), (9, 1, 1)))
    assert c2w[10, 2, 3] > 0


def test_speeds_scale_translation_and_rotation():
    action = "dw-10,none-5,il-6"
    base = camera.action_string_to_c2w(action)
    fast = camera.action_string_to_c2w(action, translation_speed=2 * SPEED)
    np.testing.assert_allclose(fast[:, :3, 3], 2 * base[:, :3, 3], atol=POSE_ATOL)
    turned = camera.action_string_to_c2w("d-10", rotation_speed_deg=1.2)
    angle = 10 * 2 * TURN
    np.testing.assert_allclose(heading(turned)[-1], [np.sin(angle), 0.0, np.cos(angle)], atol=POSE_ATOL)


def test_action_conventions_reject_unknown_names_and_bad_speeds():
    with pytest.raises(ValueError, match="unknown action convention 'wasd'; choose from sana_wm, diffusers"):
        camera.action_string_to_c2w("w-4", convention="wasd")
    with pytest.raises(ValueError, match="translation_speed must be >= 0"):
        camera.action_string_to_c2w("w-4", translation_speed=-1.0)
    with pytest.raises(ValueError, match="must be finite"):
        camera.action_string_to_c2w("w-4", rotation_speed_deg=float("nan"))


def test_key_states_show_held_keys_and_the_coast_after_release():
    levels, look = camera.action_key_states("w-3,none-2,d-2,i-1")
    w, d, i = (camera.ACTION_KEYS.index(key) for key in "wdi")
    assert levels.shape == (9, 8) and look.shape == (9, 2) and levels.dtype == np.float32
    np.testing.assert_array_equal(levels[0], 0.0)  # the first pose: nothing pressed yet
    np.testing.assert_array_equal(levels[1:4, w], 1.0)
    np.testing.assert_allclose(levels[4:6, w], COAST ** np.arange(1, 3), rtol=1e-6)
    np.testing.assert_array_equal(levels[6:8, d], 1.0)
    np.testing.assert_array_equal(levels[6:8, w], 0.0)  # pressing d snapped the forward motion to rest
    assert np.count_nonzero(levels[1:4]) == 3 and np.count_nonzero(levels[6:8]) == 2
    np.testing.assert_array_equal(look[6:8], [[1.0, 0.0], [1.0, 0.0]])  # d: yaw right
    np.testing.assert_array_equal(look[8], [0.0, 1.0])  # pressing i: pitch up, and the yaw snapped to rest


def test_key_states_look_is_the_turn_of_the_roll_out():
    action = "aw-6,none-10,d-4,dk-3,none-7"
    forward = heading(camera.action_string_to_c2w(action)).astype(np.float64)
    yaw, pitch = np.arctan2(forward[:, 0], forward[:, 2]), -np.arcsin(forward[:, 1])  # R = rot_y(yaw) rot_x(pitch)
    _, look = camera.action_key_states(action)
    assert np.abs(look).max() == 1.0 and np.count_nonzero(look) > 20
    np.testing.assert_allclose(np.diff(yaw), look[1:, 0] * TURN, atol=POSE_ATOL)
    np.testing.assert_allclose(np.diff(pitch), look[1:, 1] * TURN, atol=POSE_ATOL)


def test_key_states_read_back_from_poses_match_the_action():
    # Without opposite keys held together or pitch at its limit, a key is held exactly when its motion is full, so
    # reading the roll-out back gives the action's states. Tolerance: float32 poses, per-frame steps of 0.025 and
    # 0.01 rad, so about 1e-5 of full speed.
    action = "w-5,aw-10,none-8,l-4,dk-6,none-5,jw-3,s-4,i-3,none-6,d-700"
    c2w = camera.action_string_to_c2w(action)
    expected = camera.action_key_states(action)
    for world in (np.eye(4), np.array([[0, 0, 1, 3], [1, 0, 0, -2], [0, 1, 0, 5], [0, 0, 0, 1]], np.float64)):
        states = camera.c2w_key_states(np.einsum("ij,fjk->fik", world, c2w))  # independent of the world frame
        for got, want in zip(states, expected):
            np.testing.assert_allclose(got, want, atol=2e-5)


def test_key_states_from_poses_scale_with_the_given_speeds():
    c2w = camera.action_string_to_c2w("w-4")
    levels, _ = camera.c2w_key_states(c2w, translation_speed=0.1)
    np.testing.assert_allclose(levels[1:, camera.ACTION_KEYS.index("w")], 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="positive translation and rotation speeds"):
        camera.c2w_key_states(c2w, rotation_speed_deg=0.0)


def test_diffusers_key_states_are_the_held_keys():
    levels, look = camera.action_key_states("w-2,none-1,l-1", convention="diffusers")
    np.testing.assert_array_equal(levels[3], 0.0)  # no coasting without easing
    np.testing.assert_array_equal(look[4], [1.0, 0.0])  # l is yaw right in the diffusers mapping


def test_snap_num_frames_matches_diffusers():
    for n in range(-2, 60):
        for upper_bound in (None, 20, 41):
            assert camera.snap_num_frames(n, 8, upper_bound) == oracle_cam.snap_num_frames(
                n, 8, upper_bound=upper_bound
            ), (n, upper_bound)


# --- intrinsics ---


@pytest.mark.parametrize("form", ["vec4", "per_frame_vec4", "matrix", "per_frame_matrix"])
def test_intrinsics_per_frame_matches_pipeline(form):
    rng = np.random.default_rng(1)
    num_frames = 17
    vec4 = varying_intrinsics(rng, num_frames + 5, (480, 640))
    matrices = np.tile(np.eye(3, dtype=np.float32), (num_frames + 5, 1, 1))
    matrices[:, 0, 0], matrices[:, 1, 1], matrices[:, 0, 2], matrices[:, 1, 2] = vec4.T
    given = {"vec4": vec4[0], "per_frame_vec4": vec4, "matrix": matrices[0], "per_frame_matrix": matrices}[form]
    pipeline = SimpleNamespace(vae_temporal_compression_ratio=8)
    c2w = np.tile(np.eye(4, dtype=np.float32), (num_frames, 1, 1))
    _, expected = SanaWMPipeline.prepare_camera_trajectory(pipeline, c2w, None, given, num_frames)
    np.testing.assert_array_equal(camera.intrinsics_per_frame(given, num_frames), expected)


@pytest.mark.parametrize(
    "intrinsics, problem",
    [
        (np.ones((5, 4)), "F >= 9"),
        (np.ones((5, 3, 3)), "F >= 9"),
        (np.ones(3), "shape"),
        (np.ones((9, 3)), "shape"),
        (np.ones((2, 2)), "shape"),
        ([0.0, 500.0, 320.0, 240.0], "positive"),
        ([500.0, -1.0, 320.0, 240.0], "positive"),
        ([500.0, 500.0, np.nan, 240.0], "NaN"),
    ],
)
def test_intrinsics_per_frame_rejects_bad_input(intrinsics, problem):
    with pytest.raises(ValueError, match=problem):
        camera.intrinsics_per_frame(intrinsics, 9)


@pytest.mark.parametrize("source_size", [(480, 640), (1080, 1920), (720, 720), (333, 517), (1500, 1000)])
def test_resize_crop_intrinsics_matches_diffusers(source_size):
    source_h, source_w = source_size
    vec4 = varying_intrinsics(np.random.default_rng(2), 5, source_size)
    _, src_size, resized_size, crop_offset = oracle_cam.resize_and_center_crop(
        PIL.Image.new("RGB", (source_w, source_h))
    )
    expected = oracle_cam.transform_intrinsics_for_crop(vec4, src_size, resized_size, crop_offset)
    assert camera.center_crop_geometry(source_size) == (resized_size[::-1], crop_offset[::-1])
    np.testing.assert_array_equal(camera.resize_crop_intrinsics(vec4, source_size), expected)


def test_resize_crop_intrinsics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        camera.resize_crop_intrinsics(np.ones((4, 3)), (480, 640))
    with pytest.raises(ValueError, match="positive"):
        camera.resize_crop_intrinsics([-500.0, 500.0, 320.0, 240.0], (480, 640))
    with pytest.raises(ValueError, match="positive"):
        camera.resize_crop_intrinsics([500.0, 500.0, 320.0, 240.0], (0, 640))


# --- relative poses and the DiT camera tensors ---


def test_relative_poses_start_at_identity_and_match_inverse_first_pose():
    c2w = smooth_trajectory(np.random.default_rng(3), 9)
    relative = np.asarray(camera.relative_poses(c2w))
    expected = np.linalg.inv(c2w[0].astype(np.float64)) @ c2w.astype(np.float64)
    np.testing.assert_array_equal(relative[0], np.eye(4))
    np.testing.assert_allclose(relative, expected, atol=FLOAT32_ATOL)


@pytest.mark.parametrize(
    "c2w, problem",
    [
        (np.zeros((4, 4)), "shape"),
        (np.zeros((3, 3, 4)), "shape"),
        (np.zeros((0, 4, 4)), "shape"),
        (np.where(np.arange(16).reshape(4, 4) == 5, np.nan, np.eye(4))[None].repeat(2, 0), "NaN"),
        (np.where(np.arange(16).reshape(4, 4) == 3, np.inf, np.eye(4))[None].repeat(2, 0), "NaN or infinite"),
    ],
)
def test_relative_poses_rejects_bad_input(c2w, problem):
    with pytest.raises(ValueError, match=problem):
        camera.relative_poses(c2w)


@pytest.mark.parametrize(
    "trajectory",
    ["smooth_17", "smooth_25", "single_frame", ACTIONS[0], ACTIONS[1]],
)
def test_prepare_camera_matches_diffusers(trajectory):
    rng = np.random.default_rng(4)
    if trajectory.startswith("smooth"):
        c2w = smooth_trajectory(rng, int(trajectory.split("_")[1]))
    elif trajectory == "single_frame":
        c2w = smooth_trajectory(rng, 1)
    else:
        c2w = camera.action_string_to_c2w(trajectory)
        c2w = c2w[: camera.snap_num_frames(len(c2w), upper_bound=len(c2w))]
    intrinsics = varying_intrinsics(rng, len(c2w), camera.TARGET_SIZE)
    expected_conditions, expected_plucker = oracle_prepare_camera(c2w, intrinsics, camera.TARGET_SIZE, (8, 32, 32))
    conditions, plucker = camera.prepare_camera(c2w, intrinsics)
    num_latent_frames = (len(c2w) - 1) // 8 + 1
    assert conditions.shape == (num_latent_frames, 20) and plucker.shape == (num_latent_frames, 22, 40, 48)
    np.testing.assert_allclose(conditions, expected_conditions, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(plucker, expected_plucker, atol=FLOAT32_ATOL)


def test_prepare_camera_on_a_small_target_matches_diffusers():
    rng = np.random.default_rng(5)
    c2w = smooth_trajectory(rng, 13)
    intrinsics = varying_intrinsics(rng, 13, (64, 160))
    expected_conditions, expected_plucker = oracle_prepare_camera(c2w, intrinsics, (64, 160), (4, 32, 32))
    conditions, plucker = camera.prepare_camera(c2w, intrinsics, target_size=(64, 160), vae_stride=(4, 32, 32))
    assert plucker.shape == (4, 2, 5, 24)
    np.testing.assert_allclose(conditions, expected_conditions, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(plucker, expected_plucker, atol=FLOAT32_ATOL)


@pytest.mark.parametrize(
    "num_frames, intrinsics_shape, target_size, problem",
    [
        (16, (16, 4), (704, 1280), "8k\\+1"),
        (17, (16, 4), (704, 1280), "intrinsics must have shape"),
        (17, (4,), (704, 1280), "intrinsics must have shape"),
        (17, (17, 3, 3), (704, 1280), "intrinsics must have shape"),
        (17, (17, 4), (700, 1280), "divisible"),
    ],
)
def test_prepare_camera_rejects_bad_input(num_frames, intrinsics_shape, target_size, problem):
    c2w = np.tile(np.eye(4, dtype=np.float32), (num_frames, 1, 1))
    intrinsics = np.full(intrinsics_shape, 100.0, dtype=np.float32)
    with pytest.raises(ValueError, match=problem):
        camera.prepare_camera(c2w, intrinsics, target_size=target_size)


def test_prepare_camera_rejects_non_positive_focal_length():
    intrinsics = np.tile(np.array([[500.0, 0.0, 640.0, 352.0]], np.float32), (9, 1))
    with pytest.raises(ValueError, match="positive"):
        camera.prepare_camera(np.tile(np.eye(4, dtype=np.float32), (9, 1, 1)), intrinsics)


# --- UCPE ray transforms ---


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("patch_size", [(1, 1, 1), (1, 2, 2)])
def test_ucpe_ray_matrices_match_diffusers(frames, patch_size):
    grid = (frames, 3, 5)
    latent_hw = (grid[1] * patch_size[1], grid[2] * patch_size[2])
    conditions = random_camera_conditions(np.random.default_rng(6), 2, frames, latent_hw)
    matrices = ray_matrices(jnp.asarray(conditions), grid, patch_size)
    assert matrices.shape == (2, frames * 3 * 5, 4, 4) and matrices.dtype == jnp.float32
    np.testing.assert_allclose(matrices, oracle_ray_matrices(conditions, grid, patch_size), atol=FLOAT32_ATOL)


def test_ucpe_ray_matrices_give_identity_for_nan_rays_like_diffusers():
    conditions = random_camera_conditions(np.random.default_rng(7), 2, 3, (3, 5))
    conditions[1, 2, 0] = np.nan  # one rotation entry of batch 1, frame 2
    matrices = np.asarray(ray_matrices(jnp.asarray(conditions), (3, 3, 5), (1, 1, 1)))
    np.testing.assert_array_equal(matrices[1, 30:], np.broadcast_to(np.eye(4), (15, 4, 4)))
    np.testing.assert_allclose(matrices, oracle_ray_matrices(conditions, (3, 3, 5), (1, 1, 1)), atol=FLOAT32_ATOL)


def test_ucpe_ray_matrices_have_finite_gradients():
    conditions = jnp.asarray(random_camera_conditions(np.random.default_rng(8), 1, 2, (3, 5)))
    gradient = jax.jit(jax.grad(lambda c: jnp.sum(camera.ucpe_ray_matrices(c, (2, 3, 5)) ** 2)))(conditions)
    assert bool(jnp.all(jnp.isfinite(gradient)))


def test_ucpe_ray_matrices_reject_a_grid_that_does_not_match_the_conditions():
    conditions = jnp.zeros((2, 3, 20))
    with pytest.raises(ValueError, match="camera_conditions must have shape"):
        camera.ucpe_ray_matrices(conditions, (2, 3, 5))


def test_invert_se3_composes_to_identity_and_matches_diffusers():
    conditions = random_camera_conditions(np.random.default_rng(9), 2, 3, (3, 5))
    matrices = ray_matrices(jnp.asarray(conditions), (3, 3, 5), (1, 1, 1))
    inverse = camera.invert_se3(matrices)
    np.testing.assert_allclose(inverse @ matrices, np.broadcast_to(np.eye(4), matrices.shape), atol=FLOAT32_ATOL)
    expected = oracle_transformer._invert_SE3(torch.from_numpy(np.array(matrices))).numpy()
    np.testing.assert_allclose(inverse, expected, atol=FLOAT32_ATOL)
