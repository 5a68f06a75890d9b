"""`sample.py --mode`: the streaming demo end to end (causality of the streamed blocks along two camera paths, the
per-block report, the mp4 written block by block) and the usage errors of the modes."""

from __future__ import annotations

import re

import numpy as np

import sample
from sanawm_jax import camera
from sanawm_jax.data.video import read_video_window
from tests.test_sample import assert_one_line_usage_error


def test_streaming_camera_paths_sharing_8_latent_frames_share_the_first_blocks(tmp_path, capsys):
    """73 frames = latent frames 0-9 = blocks 0-3, 4-6, 7-9. Both paths hold `w` for 56 frames, then one turns left
    and the other right: poses 0-56 agree, so latent frames 0-6 (pixel frames <= 48, Plücker rays <= 48) and the
    pose of latent frame 7 (frame 56) see the same camera; latent frame 7's rays (frames 50-57) differ. Blocks 0 and
    1 must come out bit for bit the same (a block sees only earlier frames), block 2 must not."""
    paths = {"left": "w-56,aw-16", "right": "w-56,dw-16"}
    poses = {name: camera.action_string_to_c2w(action) for name, action in paths.items()}
    np.testing.assert_array_equal(poses["left"][:57], poses["right"][:57])
    assert not np.allclose(poses["left"][57:73], poses["right"][57:73])
    latents = {}
    for name, action in paths.items():
        out = tmp_path / f"{name}.mp4"
        sample.main(["--mode", "streaming", "--num-frames", "73", "--action", action, "--no-action-overlay",
                     "--no-compilation-cache", "--out", str(out)])
        latents[name] = np.load(tmp_path / f"{name}.latents.npz")["latents"]
        assert read_video_window(out, 0, 0)[1] == 73  # written block by block as they were decoded
        report = capsys.readouterr().out
        assert re.findall(r"block (\d): latent frames (\d)-(\d), (\d+) frames", report) == [
            ("0", "0", "3", "25"), ("1", "4", "6", "24"), ("2", "7", "9", "24")]
        assert re.search(r"streamed 73 frames \(4\.56 s of video\) in [\d.]+ s: real-time factor [\d.]+", report)
    assert latents["left"].shape[0] == 10
    np.testing.assert_array_equal(latents["left"][:7], latents["right"][:7])
    assert np.abs(latents["left"][7:] - latents["right"][7:]).max() > 1e-3


def test_mode_usage_errors(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--mode", "streaming", "--num-frames", "57"],
                                "streaming generates 24k+1 frames (k >= 2); use 49 or 73", tmp_path)
    assert_one_line_usage_error(capsys, ["--mode", "streaming", "--denoising-steps", "1000,500"],
                                "denoising_steps must have >= 2 entries and end with 0", tmp_path)
