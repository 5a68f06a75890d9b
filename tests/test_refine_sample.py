"""`sample.py --refine`: the embedded tiny refiner writes a refined mp4 beside the stage-1 one, and a checkpoint
without a converted refiner is refused before anything loads."""

from __future__ import annotations

import numpy as np
import pytest

import sample
from sanawm_jax import demo
from sanawm_jax.data.video import read_video_window
from tests.test_sample import assert_one_line_usage_error


@pytest.mark.slow  # a second whole demo run (stage 1 + stage 2)
def test_embedded_refine_writes_stage1_and_refined_videos(tmp_path, capsys):
    sample.main(["--refine", "--out", str(tmp_path / "demo.mp4"), "--no-compilation-cache"])
    stages = capsys.readouterr().err
    assert "building the tiny demo refiner" in stages and "refining" in stages
    stage1, total, size = read_video_window(tmp_path / "demo.mp4", 0, 100)
    refined, refined_total, refined_size = read_video_window(tmp_path / "demo.refined.mp4", 0, 100)
    assert total == 17 and refined_total == 16 and refined_size == size == demo.TARGET_SIZE
    assert refined.std() > 0
    with np.load(tmp_path / "demo.latents.npz") as first, np.load(tmp_path / "demo.refined.latents.npz") as second:
        np.testing.assert_array_equal(second["latents"][0], first["latents"][0])  # the sink frame is kept
        assert second["latents"].shape == first["latents"].shape
        assert np.abs(second["latents"][1:] - first["latents"][1:]).mean() > 1e-3
    with np.load(tmp_path / "demo.refined.trajectory.npz") as trajectory, \
            np.load(tmp_path / "demo.trajectory.npz") as first_trajectory:
        np.testing.assert_array_equal(trajectory["c2w"], first_trajectory["c2w"][1:])


def test_refine_with_a_checkpoint_lacking_the_refiner_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    for part in ("transformer", "vae", "text_encoder"):
        (ckpt / part).mkdir(parents=True)
        (ckpt / part / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_usage_error(capsys, ["--refine", "--checkpoint", str(ckpt)], "--refine needs", out)


@pytest.mark.slow  # a whole streaming demo run with its refinement
def test_streaming_refine_writes_each_refined_block_as_it_comes(tmp_path, capsys, monkeypatch):
    """`--mode streaming --refine` refines and decodes each stage-1 block as it comes: the refined mp4 gets its
    frames block by block, between the stage-1 blocks, and they are the whole-clip refinement of the saved stage-1
    latents (same seed, same window) decoded at once, its first frame dropped."""
    import jax

    from sanawm_jax.generate import GenerationResult, refined_result
    from sanawm_jax.models.refiner.sampler import frame_noise, refine_latents

    appended = []  # (file name, frames) in the order the writers received them

    class RecordingWriter(sample.VideoWriter):
        def append(self, frames):
            appended.append((self.path.name, np.array(frames)))
            super().append(frames)

    monkeypatch.setattr(sample, "VideoWriter", RecordingWriter)
    sample.main(["--mode", "streaming", "--refine", "--no-action-overlay", "--out", str(tmp_path / "demo.mp4"),
                 "--no-compilation-cache"])
    out = capsys.readouterr()
    assert "each block is refined as it is produced" in out.err
    assert "refined block 0: latent frames 0-3, 24 frames" in out.out
    assert "refined block 1: latent frames 4-6, 24 frames" in out.out
    # 7 latent frames in stage-1 blocks of 4 + 3: each refined block is written before the next stage-1 block
    assert [(name, len(frames)) for name, frames in appended] == [
        ("demo.mp4", 25), ("demo.refined.mp4", 24), ("demo.mp4", 24), ("demo.refined.mp4", 24)]
    with np.load(tmp_path / "demo.latents.npz") as first, np.load(tmp_path / "demo.refined.latents.npz") as second:
        stage1, streamed = first["latents"][None], second["latents"][None]
    refiner = demo.demo_refiner(0, stage1.shape[-1])
    text, mask = refiner.text_encoder.encode(demo.example_description()["caption"])
    whole = refine_latents(refiner.model, refiner.params, stage1, text, mask,
                           frame_noise(jax.random.key(0), stage1.shape), fps=16.0)
    # float32 sums over the same blocks in the same order: only XLA's program-to-program rounding differs
    np.testing.assert_allclose(streamed, np.asarray(whole), rtol=0, atol=1e-5)
    world = demo.demo_world_model(0, mode="streaming")
    c2w = np.tile(np.eye(4, dtype=np.float32), (49, 1, 1))
    expected = refined_result(world, whole, GenerationResult(stage1[0], None, c2w, np.zeros((49, 4))), False)
    written = np.concatenate([frames for name, frames in appended if name == "demo.refined.mp4"])
    # uint8 frames of float decodes that agree to ~1e-5: a value on a rounding boundary may move one level
    assert written.shape == expected.video.shape
    assert np.abs(written.astype(int) - expected.video.astype(int)).max() <= 1
    _, total, _ = read_video_window(tmp_path / "demo.refined.mp4", 0, 100)
    assert total == 48
