"""Caching videos to latents and captions to text embeddings, and loading what was cached.

Tolerances: cached latents are compared exactly with the encoder applied to the loader's own crop (same code path,
same numbers). Our Flax VAE and the diffusers VAE agree to relative L2 1e-4 in float32 (round-off through a few
convolutions; the VAE's own parity tests measure ~1e-6).
"""

import numpy as np
import pytest

from sanawm_jax.data import cache, synthetic
from sanawm_jax.data import format as clip_format
from sanawm_jax.data.pipeline import DataConfig, RejectedClips, make_dataset
from sanawm_jax.data.sources import ClipDirectorySource
from sanawm_jax.data.transforms import resize_crop_frames
from sanawm_jax.data.video import read_video_window
from tests.conftest import tiny_vae_oracle

NUM_CLIPS, SOURCE_FRAMES, HEIGHT, WIDTH = 3, 25, 64, 96
TARGET = (64, 64)


def toy_encode(video: np.ndarray) -> np.ndarray:
    """(8k+1, H, W, 3) in [-1, 1] -> (k+1, H/32, W/32, 128): every 8th frame, 32x32 mean-pooled, mixed to 128 ch."""
    frames, height, width, _ = video.shape
    pooled = video[::8].reshape(-1, height // 32, 32, width // 32, 32, 3).mean(axis=(2, 4))
    return pooled @ np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)


def toy_encoder_factory(scale: float = 1.0):
    return lambda video: scale * toy_encode(video)


@pytest.fixture(scope="module")
def cached_dir(tmp_path_factory):
    """A synthetic clip directory whose videos are cached as toy latents at TARGET."""
    root = tmp_path_factory.mktemp("cached")
    synthetic.write_synthetic_dataset(root, NUM_CLIPS, SOURCE_FRAMES, HEIGHT, WIDTH, seed=5)
    assert cache.cache_latents(root, toy_encode, TARGET) == [f"scene_{i:05d}" for i in range(NUM_CLIPS)]
    return root


def first_examples(source, **changes) -> dict[str, dict]:
    config = DataConfig(num_frames=17, target_size=TARGET, batch_size=1, num_epochs=1, random_window=False, **changes)
    batches = make_dataset(source, config, process_index=0, process_count=1)
    return {str(b["key"][0]): {k: v[0] for k, v in b.items()} for b in batches}


def test_cached_latents_encode_the_loaders_crop_of_the_video(cached_dir):
    for clip in clip_format.read_index(cached_dir):
        latents, pixel_size = clip_format.read_latents(cached_dir / clip.latents)
        frames, _, _ = read_video_window(cached_dir / clip.video, 0, SOURCE_FRAMES)
        expected = toy_encode(resize_crop_frames(frames, TARGET).astype(np.float32) / 127.5 - 1.0)
        assert pixel_size == TARGET and latents.shape == (4, 2, 2, 128)
        np.testing.assert_array_equal(latents, expected)


def test_latent_examples_share_camera_and_caption_with_video_examples(cached_dir):
    from_latents = first_examples(ClipDirectorySource(cached_dir, inputs="latents"))
    from_video = first_examples(ClipDirectorySource(cached_dir, inputs="video"))
    assert sorted(from_latents) == sorted(from_video)
    for key, latent_example in from_latents.items():
        stored, _ = clip_format.read_latents(cached_dir / "latents" / f"{key}.npz")
        np.testing.assert_array_equal(latent_example["latents"], stored[:3])
        for name in ("c2w", "intrinsics", "camera_conditions", "chunk_plucker", "caption"):
            np.testing.assert_array_equal(latent_example[name], from_video[key][name], err_msg=name)


def test_latents_whose_frame_count_does_not_match_the_poses_are_rejected(cached_dir, tmp_path):
    clip = clip_format.read_index(cached_dir)[0]
    clip_format.write_index(tmp_path, [clip])
    (tmp_path / "cameras").mkdir()
    (tmp_path / "cameras" / f"{clip.key}.npz").write_bytes(clip_format.camera_path(cached_dir, clip.key).read_bytes())
    latents, pixel_size = clip_format.read_latents(cached_dir / clip.latents)
    clip_format.write_latents(tmp_path, clip.key, latents[:3], pixel_size)  # 25 poses need 4 latent frames
    rejected = RejectedClips()
    config = DataConfig(num_frames=17, target_size=TARGET, num_epochs=1)
    source = ClipDirectorySource(tmp_path, "latents")
    assert list(make_dataset(source, config, rejected=rejected, process_count=1, process_index=0)) == []
    assert rejected.reasons() == {clip.key: "latents have 3 frames, 25 poses need 4"}


def test_latents_cli_runs_an_encoder_factory(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path, 1, 9, 32, 64, seed=1)
    encoder = ["--encoder", "tests.test_data_cache:toy_encoder_factory", "--encoder-kwargs", '{"scale": 2.0}']
    cache.main(["latents", "--data", str(tmp_path), "--height", "32", "--width", "32", *encoder])
    clip = clip_format.read_index(tmp_path)[0]
    latents, pixel_size = clip_format.read_latents(tmp_path / clip.latents)
    frames, _, _ = read_video_window(tmp_path / clip.video, 0, 9)
    expected = 2.0 * toy_encode(resize_crop_frames(frames, (32, 32)).astype(np.float32) / 127.5 - 1.0)
    assert pixel_size == (32, 32)
    np.testing.assert_array_equal(latents, expected)


def fake_text_encoder(calls: list):
    def encode(captions):
        calls.append(list(captions))
        lengths = np.array([len(c) for c in captions], np.float32)
        embeddings = lengths[:, None, None] + np.arange(12, dtype=np.float32).reshape(1, 3, 4)
        return embeddings, np.arange(3)[None] < (1 + lengths[:, None] % 3)

    return encode


def test_cache_text_encodes_each_new_caption_once_and_the_null(tmp_path):
    calls = []
    store = clip_format.TextEmbeddingStore(tmp_path)
    captions = ["a red ball", "two boxes", "a red ball", "", "a long walk"]
    assert cache.cache_text(captions, fake_text_encoder(calls), store, batch_size=2) == 3
    assert calls == [["a long walk", "a red ball"], ["two boxes"], [""]]
    embedding, mask = store.get("two boxes")
    np.testing.assert_array_equal(embedding, 9.0 + np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(mask, [True, False, False])
    np.testing.assert_array_equal(store.null()[0], np.arange(12).reshape(3, 4))
    assert cache.cache_text(captions + ["new"], fake_text_encoder(calls), store) == 1
    assert calls[-1] == ["new"]


def test_text_cli_encodes_dataset_captions_and_import_stores_precomputed_ones(tmp_path, monkeypatch):
    synthetic.write_synthetic_dataset(tmp_path / "clips", 2, 9, 32, 32, seed=3)
    monkeypatch.setattr(cache, "load_factory", lambda spec, kwargs: fake_text_encoder([]))
    cache.main(["text", "--data", str(tmp_path / "clips"), "--out", str(tmp_path / "text"), "--encoder", "any:thing"])
    store = clip_format.TextEmbeddingStore(tmp_path / "text")
    assert all(clip.caption in store for clip in clip_format.read_index(tmp_path / "clips"))

    precomputed = dict(captions=np.array(["precomputed"]), embeddings=np.ones((1, 3, 4)), masks=np.ones((1, 3), bool))
    np.savez(tmp_path / "pre.npz", **precomputed)
    cache.main(["import-text", "--embeddings", str(tmp_path / "pre.npz"), "--out", str(tmp_path / "text")])
    np.testing.assert_array_equal(store.get("precomputed")[0], np.ones((3, 4)))


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    """A randomised diffusers LTX-2 VAE (strides t8/h32/w32, 8 latent channels) saved as a diffusers folder."""
    vae = tiny_vae_oracle(stats_seed=1, mean_scale=0.1, scaling_factor=0.7)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def test_our_vae_and_the_diffusers_vae_cache_the_same_latents(tiny_vae_folder):
    video = np.random.default_rng(0).uniform(-1, 1, size=(9, 64, 64, 3)).astype(np.float32)
    ours = cache.sanawm_vae_encoder(str(tiny_vae_folder))(video)
    reference = cache.diffusers_vae_encoder(str(tiny_vae_folder), subfolder=None)(video)
    assert ours.shape == reference.shape == (2, 2, 2, 8)
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4


class RecordingTextEncoder:
    """Stands in for `sanawm_jax.models.gemma.TextEncoder`: records calls; `encode` returns (B, 3, 4) embeddings filled
    with each prompt's length and (B, 3) masks, `encode_negative` a distinct -1 embedding."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, folder):
        cls.calls.append(("from_pretrained", folder))
        return cls()

    def encode(self, prompts):
        self.calls.append(("encode", list(prompts)))
        lengths = np.array([len(prompt) for prompt in prompts], np.float32)
        embeddings = np.broadcast_to(lengths[:, None, None], (len(prompts), 3, 4)).copy()
        return embeddings, np.tile([[1, 1, 0]], (len(prompts), 1))

    def encode_negative(self, prompts=""):
        self.calls.append(("encode_negative", prompts))
        return np.full((1, 3, 4), -1.0, np.float32), np.array([[1, 0, 0]], np.int32)


def test_text_cli_uses_our_prompt_encoder_with_the_empty_prompt_as_null(tmp_path, monkeypatch):
    """The null embedding is "" through the caption path (prefix and mask), not the negative prompt."""
    from sanawm_jax.models import gemma

    synthetic.write_synthetic_dataset(tmp_path / "clips", 1, 9, 32, 32, seed=4)
    monkeypatch.setattr(gemma, "TextEncoder", RecordingTextEncoder)
    monkeypatch.setattr(RecordingTextEncoder, "calls", [])
    cache.main(["text", "--data", str(tmp_path / "clips"), "--out", str(tmp_path / "text"), "--text-encoder", "gemma"])
    caption = clip_format.read_index(tmp_path / "clips")[0].caption
    assert RecordingTextEncoder.calls == [("from_pretrained", "gemma"), ("encode", [caption]), ("encode", [""])]
    null_embedding, null_mask = clip_format.TextEmbeddingStore(tmp_path / "text").null()
    np.testing.assert_array_equal(null_embedding, np.zeros((3, 4)))
    np.testing.assert_array_equal(null_mask, [True, True, False])
