"""`sample.py` end to end: the embedded default writes a playable video, a converted pipeline checkpoint (written
here from tiny diffusers/transformers models) loads and samples, and bad inputs fail early naming the problem."""

from __future__ import annotations

import copy
import shutil

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import convert_torch_weights
import sample
from sanawm_jax import demo
from sanawm_jax.data.video import read_video_window
from sanawm_jax.models.gemma.encoder import TextEncoder
from sanawm_jax.models.ltx2_vae import convert_vae
from sanawm_jax.pipeline import load_text_encoder, load_vae
from tests.conftest import TINY_VAE_DIFFUSERS_CONFIG, randomize_


def video_fps(path) -> float:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return meta["fps"]


def test_embedded_default_writes_video_latents_and_trajectory(tmp_path):
    out = tmp_path / "demo.mp4"
    sample.main(["--out", str(out)])
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


def test_sample_from_converted_checkpoint(converted_pipeline, tmp_path):
    image = demo.asset_path(demo.EXAMPLE_IMAGE)
    fx, fy, cx, cy = demo.example_intrinsics()
    out = tmp_path / "video.mp4"
    sample.main(["--checkpoint", str(converted_pipeline), "--image", str(image), "--prompt", "a room",
                 "--action", "w-8", "--intrinsics", f"{fx},{fy},{cx},{cy}", "--num-frames", "9", "--steps", "2",
                 "--cfg", "3", "--dtype", "float32", "--out", str(out)])
    _, total, size = read_video_window(out, 0, 0)
    assert total == 9 and size == (704, 1280)


@pytest.mark.parametrize(
    "extra_args, message",
    [
        (["--image", "missing.png"], "cannot read image missing.png"),
        (["--intrinsics", "1,2,3"], "intrinsics"),
        (["--num-frames", "33"], "fewer than the 33 requested"),
        (["--num-frames", "20"], "8k\\+1"),
        (["--action", "w-16,q-4"], "q"),
    ],
    ids=["unreadable-image", "intrinsics-shape", "short-trajectory", "frame-count", "unknown-action-key"],
)
def test_bad_inputs_fail_early_with_a_named_problem(tmp_path, extra_args, message):
    with pytest.raises(ValueError, match=message):
        sample.main(["--out", str(tmp_path / "x.mp4"), *extra_args])
    assert not (tmp_path / "x.mp4").exists()


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
