"""`sample.py` end to end: the embedded default writes a playable video, a converted pipeline checkpoint (written
here from tiny diffusers/transformers models) loads and samples, and bad inputs fail early naming the problem."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import convert_torch_weights
import sample
from sanawm_jax import cli, demo, generate
from sanawm_jax.data.evaluation import psnr_per_frame
from sanawm_jax.data.synthetic import generate_clip, render, to_uint8
from sanawm_jax.data.video import read_video_window
from sanawm_jax.generate import WorldModel
from sanawm_jax.models.gemma.encoder import MAX_SEQUENCE_LENGTH, TextEncoder
from sanawm_jax.models.ltx2_vae import convert_vae
from sanawm_jax.pipeline import load_text_encoder, load_vae
from tests.conftest import TINY_VAE_DIFFUSERS_CONFIG, randomize_


def video_fps(path) -> float:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return meta["fps"]


def test_embedded_default_writes_video_latents_and_trajectory(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    sample.main(["--out", str(out), "--no-compilation-cache"])
    stages = capsys.readouterr().err
    for stage in ("camera path", "building the tiny demo models", "encoding the prompt", "encoding the first frame",
                  "denoising", "decoding", "writing"):
        assert stage in stages
    frames, total, size = read_video_window(out, 0, 100)
    assert total == 17 and size == demo.TARGET_SIZE and video_fps(out) == 16
    assert frames.std() > 0
    with np.load(tmp_path / "demo.latents.npz") as latents:
        assert latents["latents"].shape == (3, 4, 7, 8)
    with np.load(tmp_path / "demo.trajectory.npz") as trajectory:
        assert trajectory["c2w"].shape == (17, 4, 4) and trajectory["intrinsics"].shape == (17, 4)
        np.testing.assert_allclose(trajectory["c2w"][0], np.eye(4), atol=1e-6)


@pytest.fixture(scope="module")
def pipeline_root(tiny_oracle, tmp_path_factory):
    """A diffusers-style pipeline root with a tiny DiT, LTX-2 VAE, Gemma-2 and tokenizer (random weights)."""
    from diffusers import AutoencoderKLLTX2Video
    from transformers import Gemma2Config, Gemma2ForCausalLM

    root = tmp_path_factory.mktemp("pipeline")
    oracle, _ = tiny_oracle
    copy.deepcopy(oracle).float().save_pretrained(root / "transformer")
    torch.manual_seed(0)
    vae = randomize_(AutoencoderKLLTX2Video(**TINY_VAE_DIFFUSERS_CONFIG), seed=2)
    vae.save_pretrained(root / "vae")
    tokenizer = demo.byte_tokenizer()
    gemma = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                         query_pre_attn_scalar=8)
    randomize_(Gemma2ForCausalLM(gemma), seed=3).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def converted_pipeline(pipeline_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    convert_torch_weights.main([str(pipeline_root), str(out)])
    return out


def test_pipeline_conversion_matches_component_converters(pipeline_root, converted_pipeline):
    _, expected = convert_vae(pipeline_root / "vae")
    _, restored = load_vae(converted_pipeline)
    flat = lambda tree: {k: np.asarray(v) for k, v in __import__("jax").tree_util.tree_leaves_with_path(tree)}
    assert flat(restored).keys() == flat(expected).keys()
    for key, value in flat(expected).items():
        np.testing.assert_array_equal(flat(restored)[key], value)
    ours = load_text_encoder(converted_pipeline).encode("a red ball")
    reference = TextEncoder.from_pretrained(pipeline_root).encode("a red ball")
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(reference[0]))
    np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(reference[1]))


@pytest.mark.slow  # the fast tier samples a converted checkpoint with precomputed embeddings
def test_sample_from_converted_checkpoint(converted_pipeline, tmp_path):
    image = demo.asset_path(demo.EXAMPLE_IMAGE)
    fx, fy, cx, cy = demo.example_intrinsics()
    out = tmp_path / "video.mp4"
    sample.main(["--checkpoint", str(converted_pipeline), "--image", str(image), "--prompt", "a room",
                 "--action", "w-8", "--intrinsics", f"{fx},{fy},{cx},{cy}", "--num-frames", "9", "--steps", "2",
                 "--cfg", "3", "--dtype", "float32", "--out", str(out)])
    _, total, size = read_video_window(out, 0, 0)
    assert total == 9 and size == (704, 1280)


def assert_one_line_usage_error(capsys, argv, expected: str, out_dir: Path) -> str:
    """The run stops with exit code 2, one `error: ...` line on stderr containing `expected`, and writes nothing;
    returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(sample.main, [*argv, "--out", str(out_dir / "x.mp4")])
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USAGE_EXIT_CODE
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert list(out_dir.iterdir()) == []
    return err


def test_frame_count_not_8k_plus_1_names_the_nearest_valid_counts(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--num-frames", "20"], "error: --num-frames 20 is not 8k+1; use 17 or 25",
                                tmp_path)


def test_unknown_action_key_names_the_segment_and_the_allowed_keys(tmp_path, capsys):
    err = assert_one_line_usage_error(capsys, ["--action", "w-40,zz-3"], "'zz-3'", tmp_path)
    assert "allowed keys: w s a d i k j l" in err


def test_missing_image_is_one_line(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--image", str(tmp_path / "missing.png")], "cannot read image", tmp_path)


def test_text_file_named_png_is_one_line(tmp_path, capsys):
    fake = tmp_path / "inputs" / "notes.png"
    fake.parent.mkdir()
    fake.write_text("not an image")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_one_line_usage_error(capsys, ["--image", str(fake)], f"cannot read image {fake}", out_dir)


def test_malformed_intrinsics_are_one_line(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--intrinsics", "1,2"], "--intrinsics takes fx,fy,cx,cy", tmp_path)


def test_missing_checkpoint_is_named_before_missing_flags(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--checkpoint", str(tmp_path / "nonexistent")],
                                f"checkpoint {tmp_path / 'nonexistent'} does not exist", tmp_path)


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="is not 8k\\+1"):
        cli.run(sample.main, ["--num-frames", "20", "--debug", "--out", str(tmp_path / "x.mp4")])


def test_trajectory_shorter_than_the_frame_count_is_named(tmp_path, capsys):
    assert_one_line_usage_error(capsys, ["--action", "w-8", "--num-frames", "33"], "fewer than the 33 requested",
                                tmp_path)


@pytest.mark.parametrize("num_frames", [9, 41, 961])
def test_demo_camera_path_covers_any_frame_count(num_frames):
    source_size = (480, 640)
    c2w, intrinsics = generate.camera_path(num_frames, source_size, demo.TARGET_SIZE,
                                           intrinsics=demo.example_intrinsics(),
                                           action=demo.default_action(num_frames))
    assert c2w.shape == (num_frames, 4, 4) and intrinsics.shape == (num_frames, 4)
    # The path keeps moving to its last frame: every step changes the camera position.
    assert np.all(np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=1) > 0)


@pytest.mark.slow
def test_embedded_default_runs_41_frames(tmp_path):
    out = tmp_path / "long.mp4"
    sample.main(["--num-frames", "41", "--steps", "1", "--cfg", "1", "--no-action-overlay", "--no-compilation-cache",
                 "--out", str(out)])
    assert read_video_window(out, 0, 0)[1] == 41
    with np.load(tmp_path / "long.trajectory.npz") as trajectory:
        c2w = trajectory["c2w"]
    assert c2w.shape == (41, 4, 4)
    # The default path keeps moving to its last frame: every step changes the pose.
    assert np.all(np.abs(np.diff(c2w[:, :3, 3], axis=0)).sum(axis=1) > 0)


@pytest.mark.slow
def test_embedded_default_shows_the_courtyard_moving_along_the_action_path(tmp_path, monkeypatch):
    """The main command's video against the ground-truth render of the held-out courtyard along the same trajectory
    (from the trajectory.npz it writes): the trained demo weights beat seeded random ones by at least 3 dB."""
    held_out = demo.example_description()["synthetic_clip"]
    clip = generate_clip(held_out["seed"], held_out["index"], held_out["num_frames"], *demo.TARGET_SIZE)
    psnr = {}
    for trained in (True, False):
        monkeypatch.setattr(demo, "has_trained_weights", lambda trained=trained, **_: trained)
        out = tmp_path / f"trained_{trained}.mp4"
        sample.main(["--out", str(out), "--no-action-overlay", "--no-compilation-cache"])
        video, _, _ = read_video_window(out, 0, 17)
        with np.load(out.with_name(f"{out.stem}.trajectory.npz")) as trajectory:
            c2w, intrinsics = trajectory["c2w"], trajectory["intrinsics"]
        truth = to_uint8(render(clip.scene, clip.c2w[0] @ c2w, intrinsics, *demo.TARGET_SIZE).rgb)
        psnr[trained] = float(np.mean(psnr_per_frame(video, truth)[1:]))  # the generated frames
    assert psnr[True] >= psnr[False] + 3.0, psnr


def test_prompt_longer_than_the_encoder_window_warns_that_it_was_truncated(caplog):
    world = demo.demo_world_model()
    tail = "the end of a very long prompt"
    with caplog.at_level(logging.WARNING, logger="sanawm_jax.models.gemma.encoder"):
        world.text_encoder.encode("short prompt")
        assert caplog.records == []
        world.text_encoder.encode("x" * (MAX_SEQUENCE_LENGTH + 20) + tail)  # byte tokens: one per character
    [record] = caplog.records
    assert "truncated" in record.message and f"{MAX_SEQUENCE_LENGTH}-token window" in record.message
    assert tail in record.message


def test_failed_write_leaves_no_output_behind(tmp_path, monkeypatch):
    result = generate.GenerationResult(
        latents=np.zeros((3, 4, 7, 8), np.float32), video=np.zeros((17, 64, 96, 3), np.uint8),
        c2w=np.tile(np.eye(4, dtype=np.float32), (17, 1, 1)), intrinsics=np.ones((17, 4), np.float32))

    def write_then_fail(path, *args, **kwargs):  # the disk fills up after the video is written
        write_video(path, *args, **kwargs)
        raise OSError("No space left on device")

    write_video = generate.write_video
    monkeypatch.setattr(generate, "write_video", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        generate.write_outputs(tmp_path / "clip.mp4", result, action_overlay=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(generate, "write_video", write_video)
    written = generate.write_outputs(tmp_path / "clip.mp4", result, action_overlay=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in written.values())


def test_implementation_flags_and_sharding_reach_the_model(converted_pipeline):
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    # cudnn attention cannot even be traced without a GPU, so the pass-through is shown with the GDN kernel.
    world = WorldModel.from_checkpoint(converted_pipeline, with_text_encoder=False, sharding=cpu, gdn_impl="pallas")
    assert world.model.config.gdn_impl == "pallas"
    assert all(leaf.sharding == cpu for leaf in jax.tree.leaves(world.params))
    assert demo.demo_world_model(gdn_impl="pallas").model.config.gdn_impl == "pallas"


def test_missing_checkpoint_part_is_named(converted_pipeline, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(converted_pipeline, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match="lacks vae/"):
        sample.main(["--checkpoint", str(partial), "--image", str(demo.asset_path(demo.EXAMPLE_IMAGE)),
                     "--prompt", "x", "--action", "w-8", "--intrinsics", "100,100,50,50", "--num-frames", "9",
                     "--out", str(tmp_path / "x.mp4")])


def test_sample_with_precomputed_embeddings_needs_no_text_encoder(converted_pipeline, tmp_path):
    from sanawm_jax.models.gemma.encoder import PromptEmbeddings, save_embeddings_npz

    partial = tmp_path / "no_text"
    shutil.copytree(converted_pipeline, partial)
    shutil.rmtree(partial / "text_encoder")
    rng = np.random.default_rng(0)
    embeddings = PromptEmbeddings(rng.standard_normal((1, 6, 32)).astype(np.float32), np.ones((1, 6), np.int32))
    save_embeddings_npz(tmp_path / "text.npz", embeddings)
    fx, fy, cx, cy = demo.example_intrinsics()
    out = tmp_path / "video.mp4"
    sample.main(["--checkpoint", str(partial), "--image", str(demo.asset_path(demo.EXAMPLE_IMAGE)),
                 "--embeddings", str(tmp_path / "text.npz"), "--action", "w-8", "--intrinsics", f"{fx},{fy},{cx},{cy}",
                 "--num-frames", "9", "--steps", "1", "--cfg", "1", "--dtype", "float32", "--fused", "--out", str(out)])
    assert read_video_window(out, 0, 0)[1] == 9


@pytest.mark.slow
def test_second_run_of_the_main_command_compiles_nothing(tmp_path):
    """The persistent compilation cache serves every program of a repeated run: no new entry, same outputs."""
    repo = Path(sample.__file__).parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), cli.CACHE_ENV: str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu"}
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run / "demo.mp4"
        subprocess.run([sys.executable, "sample.py", "--out", str(out)], cwd=repo, env=env, check=True,
                       capture_output=True)
        outputs.append({path.name: path.read_bytes() for path in out.parent.iterdir()})
        if run == "first":
            entries = sorted((tmp_path / "cache").iterdir())
    assert entries and sorted((tmp_path / "cache").iterdir()) == entries
    assert outputs[0] == outputs[1]
