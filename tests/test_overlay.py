"""The WASD + joystick overlay: it draws only inside its panel, lights the keys that are pressed, puts the joystick
knob where the view is turning, and reaches the mp4 but not the .npz outputs, for action strings and pose paths."""

import numpy as np
import pytest

from sanawm_jax import camera, overlay
from sanawm_jax.data.video import read_video_window
from sanawm_jax.generate import GenerationResult, write_outputs

HEIGHT, WIDTH = 180, 320
NO_KEYS = np.zeros(8)


def flat_video(frames, height=HEIGHT, width=WIDTH, value=(90, 110, 140)):
    return np.broadcast_to(np.array(value, np.uint8), (frames, height, width, 3)).copy()


def key_row(*keys):
    return np.array([float(key in keys) for key in camera.ACTION_KEYS])


def box_pixels(frame, box):
    left, top, right, bottom = box
    return frame[top:bottom, left:right].reshape(-1, 3).astype(np.int32)


def amber(pixels):
    """Mask of lit-amber pixels (strong red and green, little blue), as LIT_RGBA blends over any background."""
    return (pixels[..., 0] > 180) & (pixels[..., 1] > 130) & (pixels[..., 2] < 110)


def test_overlay_changes_pixels_only_inside_its_panel():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8)
    levels, look = rng.uniform(0, 1, (3, 8)), rng.uniform(-1, 1, (3, 2))
    out = overlay.draw_action_overlay(video, levels, look)
    assert out.shape == video.shape and out.dtype == np.uint8
    left, top, right, bottom = overlay.overlay_layout(HEIGHT, WIDTH).panel
    inside = np.zeros((HEIGHT, WIDTH), bool)
    inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(out[:, ~inside], video[:, ~inside])
    assert (out[:, inside] != video[:, inside]).mean() > 0.5
    assert 0 < (bottom - top) * (right - left) < 0.2 * HEIGHT * WIDTH and bottom <= HEIGHT and left >= 0


@pytest.mark.parametrize("key", list(camera.ACTION_KEYS))
def test_a_pressed_key_lights_only_its_cap(key):
    out = overlay.draw_action_overlay(flat_video(2), np.stack([NO_KEYS, key_row(key)]), np.zeros((2, 2)))
    layout = overlay.overlay_layout(HEIGHT, WIDTH)
    for name, box in layout.keys.items():
        unlit, lit = box_pixels(out[0], box), box_pixels(out[1], box)
        if name == key:
            assert amber(lit).mean() > 0.5 and amber(unlit).mean() == 0, name
        else:
            np.testing.assert_array_equal(lit, unlit, err_msg=name)


@pytest.mark.parametrize("look, direction", [((1, 0), (1, 0)), ((-1, 0), (-1, 0)), ((0, 1), (0, -1)),
                                             ((0, -1), (0, 1))])
def test_the_joystick_knob_points_where_the_view_turns(look, direction):
    # Yaw right moves the knob right; pitch up moves it up (image rows grow downwards).
    out = overlay.draw_action_overlay(flat_video(2), np.zeros((2, 8)), np.array([(0.0, 0.0), look]))
    left, top, right, bottom = overlay.overlay_layout(HEIGHT, WIDTH).joystick
    rows, columns = np.nonzero(amber(out[1, top:bottom, left:right].astype(np.int32)))
    assert amber(out[0, top:bottom, left:right].astype(np.int32)).sum() == 0  # at rest: no lit knob or arrow
    offset = np.array([columns.mean() - (right - left - 1) / 2, rows.mean() - (bottom - top - 1) / 2])
    size = right - left
    assert np.all(np.sign(np.round(offset / size, 1)) == direction), offset


def test_overlay_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        overlay.draw_action_overlay(flat_video(1).astype(np.float32), np.zeros((1, 8)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"key_levels must be \(2, 8\)"):
        overlay.draw_action_overlay(flat_video(2), np.zeros((1, 8)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="too small"):
        overlay.draw_action_overlay(flat_video(1, 32, 32), np.zeros((1, 8)), np.zeros((1, 2)))


def test_write_outputs_puts_the_overlay_on_the_mp4_only(tmp_path):
    action = "w-4,aw-4"
    frames, (height, width) = 9, (128, 224)
    rng = np.random.default_rng(1)
    result = GenerationResult(
        latents=rng.normal(size=(2, 4, 7, 8)).astype(np.float32),
        video=flat_video(frames, height, width),
        c2w=camera.action_string_to_c2w(action),
        intrinsics=np.tile(np.float32([100, 100, 112, 64]), (frames, 1)),
    )
    plain = write_outputs(tmp_path / "plain.mp4", result, action=action, action_overlay=False)
    drawn = write_outputs(tmp_path / "drawn.mp4", result, action=action)
    plain_frames, _, _ = read_video_window(plain["video"], 0, frames)
    drawn_frames, _, _ = read_video_window(drawn["video"], 0, frames)
    left, top, right, bottom = overlay.overlay_layout(height, width).panel
    difference = np.abs(drawn_frames.astype(np.int32) - plain_frames)
    assert difference[:, top:bottom, left:right].mean() > 10
    # Outside the panel only H.264 rounding near its edges may differ (flat frames encode almost exactly).
    difference[:, top - 8 : bottom + 8, max(0, left - 8) : right + 8] = 0
    assert difference.max() <= 3
    for outputs in (plain, drawn):
        with np.load(outputs["latents"]) as latents, np.load(outputs["trajectory"]) as trajectory:
            np.testing.assert_array_equal(latents["latents"], result.latents)
            np.testing.assert_array_equal(trajectory["c2w"], result.c2w)
            np.testing.assert_array_equal(trajectory["intrinsics"], result.intrinsics)


def test_write_outputs_reads_the_keys_back_from_the_poses_without_an_action(tmp_path):
    action, frames, (height, width) = "w-4,ak-4", 9, (128, 224)
    result = GenerationResult(
        latents=np.zeros((2, 4, 7, 8), np.float32),
        video=flat_video(frames, height, width),
        c2w=camera.action_string_to_c2w(action),
        intrinsics=np.tile(np.float32([100, 100, 112, 64]), (frames, 1)),
    )
    from_action = write_outputs(tmp_path / "action.mp4", result, action=action)["video"]
    from_poses = write_outputs(tmp_path / "poses.mp4", result)["video"]
    plain = write_outputs(tmp_path / "plain.mp4", result, action_overlay=False)["video"]
    decoded = [read_video_window(path, 0, frames)[0].astype(np.int32) for path in (from_action, from_poses, plain)]
    assert np.abs(decoded[1] - decoded[2]).max() > 50  # the pose path gets an overlay too
    assert np.abs(decoded[0] - decoded[1]).max() <= 2  # and it is the action's, up to rounding and the codec
