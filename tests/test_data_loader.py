"""The grain loader on a generated synthetic clip directory and on a tiny upstream-layout set written here.

Tolerances: camera tensors built by the loader go through the same `camera.prepare_camera` as the reference, so they
match exactly; poses relativised by our code vs float64 numpy inverses agree to 1e-5 on metre-scale translations
and unit rotations (float32 arithmetic); intrinsics are float32 products of a few terms, 1e-4 px.
"""

import io
import json
import zipfile

import numpy as np
import pytest

from sanawm_jax import camera
from sanawm_jax.data import TextEmbeddingStore, synthetic
from sanawm_jax.data.pipeline import DataConfig, make_dataset
from sanawm_jax.data.sources import ClipDirectorySource, UpstreamZipSource
from sanawm_jax.data.video import read_video_window

NUM_CLIPS, SOURCE_FRAMES, HEIGHT, WIDTH = 6, 25, 64, 96
TEXT_LENGTH, TEXT_DIM = 8, 16


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_dataset(root, NUM_CLIPS, SOURCE_FRAMES, HEIGHT, WIDTH, seed=11)
    return root


def fake_embedding(caption: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(caption) * 7919 + sum(map(ord, caption)))
    mask = np.arange(TEXT_LENGTH) < 3 + len(caption) % 5
    return rng.normal(size=(TEXT_LENGTH, TEXT_DIM)).astype(np.float32), mask


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, synthetic_dir):
    store = TextEmbeddingStore(tmp_path_factory.mktemp("text"))
    for clip in ClipDirectorySource(synthetic_dir).clips:
        store.put(clip.caption, *fake_embedding(clip.caption))
    store.put_null(np.zeros((TEXT_LENGTH, TEXT_DIM), np.float32), np.arange(TEXT_LENGTH) < 1)
    return store


def config(**changes) -> DataConfig:
    defaults = dict(num_frames=17, target_size=(64, 64), batch_size=2, num_epochs=1, num_threads=2)
    return DataConfig(**{**defaults, **changes})


def all_batches(dataset) -> list[dict]:
    return list(iter(dataset))


def single_examples(source, **changes) -> list[dict]:
    """Every example of one epoch, unbatched, in loader order."""
    batches = all_batches(make_dataset(source, config(batch_size=1, **changes), process_index=0, process_count=1))
    return [{key: value[0] for key, value in batch.items()} for batch in batches]


# ---------------------------------------------------------------------------
# Synthetic clip directory
# ---------------------------------------------------------------------------


def test_batches_have_the_documented_shapes_and_dtypes(synthetic_dir, text_store):
    dataset = make_dataset(ClipDirectorySource(synthetic_dir), config(), text_store, process_index=0, process_count=1)
    batch = next(iter(dataset))
    expected = {
        "video": ((2, 17, 64, 64, 3), np.float32),
        "camera_conditions": ((2, 3, 20), np.float32),
        "chunk_plucker": ((2, 3, 2, 2, 48), np.float32),
        "c2w": ((2, 17, 4, 4), np.float32),
        "intrinsics": ((2, 17, 4), np.float32),
        "text": ((2, TEXT_LENGTH, TEXT_DIM), np.float32),
        "text_mask": ((2, TEXT_LENGTH), np.bool_),
        "caption_dropped": ((2,), np.bool_),
        "clip_index": ((2,), np.int64),
        "frame_start": ((2,), np.int64),
    }
    assert {key: (value.shape, value.dtype) for key, value in batch.items() if key in expected} == expected
    assert batch["caption"].shape == batch["key"].shape == (2,)
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0


def test_video_is_the_centre_crop_of_the_decoded_window(synthetic_dir):
    source = ClipDirectorySource(synthetic_dir)
    example = single_examples(source)[0]
    start = int(example["frame_start"])
    frames, _, _ = read_video_window(source[int(example["clip_index"])].video, start, 17)
    np.testing.assert_array_equal(example["video"], frames[:, :, 16:80].astype(np.float32) / 127.5 - 1.0)


@pytest.mark.parametrize("target_size, scale, left", [((64, 64), 1.0, 16.0), ((32, 32), 0.5, 8.0)])
def test_intrinsics_follow_the_resize_and_crop(synthetic_dir, target_size, scale, left):
    # 64x96 covering 64x64: no resize, 16 columns cropped each side; covering 32x32: halved to 32x48, 8 cropped.
    source = ClipDirectorySource(synthetic_dir)
    for example in single_examples(source, target_size=target_size):
        stored = source[int(example["clip_index"])].intrinsics[0]
        expected = [stored[0] * scale, stored[1] * scale, stored[2] * scale - left, stored[3] * scale]
        np.testing.assert_allclose(example["intrinsics"], np.broadcast_to(expected, (17, 4)), atol=1e-4)


def test_poses_are_relative_to_the_window_start(synthetic_dir):
    source = ClipDirectorySource(synthetic_dir)
    for example in single_examples(source):
        start = int(example["frame_start"])
        stored = source[int(example["clip_index"])].c2w[start : start + 17].astype(np.float64)
        np.testing.assert_array_equal(example["c2w"][0], np.eye(4, dtype=np.float32))
        np.testing.assert_allclose(example["c2w"], np.linalg.inv(stored[0]) @ stored, atol=1e-5)


def test_camera_tensors_equal_prepare_camera(synthetic_dir):
    for example in single_examples(ClipDirectorySource(synthetic_dir)):
        conditions, plucker = camera.prepare_camera(example["c2w"], example["intrinsics"], (64, 64))
        np.testing.assert_array_equal(example["camera_conditions"], np.asarray(conditions))
        np.testing.assert_array_equal(example["chunk_plucker"], np.asarray(plucker))


def test_random_windows_vary_and_are_reproducible(synthetic_dir):
    source = ClipDirectorySource(synthetic_dir)
    starts = [int(e["frame_start"]) for e in single_examples(source, seed=4)]
    assert starts == [int(e["frame_start"]) for e in single_examples(source, seed=4)]
    assert len(set(starts)) > 1 and max(starts) <= SOURCE_FRAMES - 17
    assert {int(e["frame_start"]) for e in single_examples(source, random_window=False)} == {0}


def test_caption_dropout_swaps_in_the_null_embedding(synthetic_dir, text_store):
    source = ClipDirectorySource(synthetic_dir)
    run = config(batch_size=1, caption_dropout=0.5, seed=1)
    dataset = make_dataset(source, run, text_store, process_index=0, process_count=1)
    examples = [{k: v[0] for k, v in batch.items()} for batch in iter(dataset)]
    dropped = [bool(e["caption_dropped"]) for e in examples]
    assert 0 < sum(dropped) < len(dropped)
    null_text, null_mask = text_store.null()
    for example, was_dropped in zip(examples, dropped):
        caption = str(example["caption"])
        expected_text, expected_mask = (null_text, null_mask) if was_dropped else fake_embedding(caption)
        np.testing.assert_array_equal(example["text"], expected_text)
        np.testing.assert_array_equal(example["text_mask"], expected_mask)


def test_shuffling_is_seeded_and_changes_between_epochs(synthetic_dir):
    source = ClipDirectorySource(synthetic_dir)

    def order(seed):
        return [int(e["clip_index"]) for e in single_examples(source, seed=seed, num_epochs=2, random_window=False)]

    first = order(0)
    assert first == order(0)
    assert sorted(first[:NUM_CLIPS]) == sorted(first[NUM_CLIPS:]) == list(range(NUM_CLIPS))
    assert first[:NUM_CLIPS] != first[NUM_CLIPS:]
    assert first != order(1)


def test_restored_iterator_yields_the_batches_of_an_uninterrupted_one(synthetic_dir, text_store):
    source = ClipDirectorySource(synthetic_dir)
    run = config(num_epochs=2, caption_dropout=0.3, seed=9)  # shuffled, random windows, caption dropout
    uninterrupted = all_batches(make_dataset(source, run, text_store, process_index=0, process_count=1))
    assert len(uninterrupted) == NUM_CLIPS  # 2 epochs of 6 clips in batches of 2

    interrupted = iter(make_dataset(source, run, text_store, process_index=0, process_count=1))
    for _ in range(4):  # into the second epoch
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = iter(make_dataset(source, run, text_store, process_index=0, process_count=1))
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == 2
    for expected, actual in zip(uninterrupted[4:], rest):
        assert expected.keys() == actual.keys()
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_two_processes_see_disjoint_halves_that_make_up_the_epoch(synthetic_dir):
    source = ClipDirectorySource(synthetic_dir)
    seen = []
    for process in range(2):
        dataset = make_dataset(source, config(batch_size=1), process_index=process, process_count=2)
        seen.append([int(batch["clip_index"][0]) for batch in iter(dataset)])
    assert len(seen[0]) == len(seen[1]) == NUM_CLIPS // 2
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_CLIPS))



def test_processes_stack_into_the_global_batch_of_one_process(synthetic_dir):
    """Process p of 2 loading batches of 2 gets rows [2p, 2p+2) of every batch of 4 that one process loads (the same
    clips in the same order), so a 2-process run sees the batches of a 1-process run."""
    source = ClipDirectorySource(synthetic_dir)
    one = [batch["clip_index"].tolist() for batch in iter(make_dataset(source, config(batch_size=4), process_index=0,
                                                                      process_count=1))]
    per_process = [[batch["clip_index"].tolist() for batch in iter(make_dataset(
        source, config(batch_size=2), process_index=p, process_count=2))] for p in range(2)]
    assert len(one) == NUM_CLIPS // 4
    assert [a + b for a, b in zip(*per_process)] == one

# ---------------------------------------------------------------------------
# Upstream layout (NVlabs/Sana SanaWMZipLatentDataset)
# ---------------------------------------------------------------------------

UPSTREAM_SOURCE_SIZE = (54, 96)  # capture (H, W); the latents encode 64x64 frames (2x2 latent grid)
UPSTREAM_FRAMES = {"clip_a": 17, "clip_b": 17, "clip_c": 19}  # 19 poses -> 3 latent frames, as 17 do
CAPTION_SUFFIX = "_LongSceneStaticCaption-Qwen3-VL-30B-A3B-Instruct"


def random_c2w(rng, count):
    angles = np.cumsum(rng.normal(scale=0.05, size=(count, 3)), axis=0)
    rotation = synthetic.rotation_yaw_pitch_roll(*angles.T)
    c2w = np.tile(np.eye(4), (count, 1, 1))
    c2w[:, :3, :3] = rotation
    c2w[:, :3, 3] = np.cumsum(rng.normal(scale=0.1, size=(count, 3)), axis=0) + [1.0, -0.5, 2.0]
    return c2w.astype(np.float32)


@pytest.fixture(scope="module")
def upstream_dirs(tmp_path_factory):
    """raw/part0.zip + sidecars and latents/part0.zip with z (C=128, T=3, 2, 2); returns (raw, latents, truth)."""
    root = tmp_path_factory.mktemp("upstream")
    raw, cache = root / "raw", root / "latents"
    raw.mkdir()
    cache.mkdir()
    rng = np.random.default_rng(0)
    truth, poses, intrinsics, ranges = {}, [], [], []
    with zipfile.ZipFile(raw / "part0.zip", "w") as raw_zip, zipfile.ZipFile(cache / "part0.zip", "w") as cache_zip:
        for key, count in UPSTREAM_FRAMES.items():
            height, width = UPSTREAM_SOURCE_SIZE
            info = {"prompt": f"json prompt of {key}", "height": height, "width": width}
            raw_zip.writestr(f"{key}.json", json.dumps(info))
            z = rng.normal(size=(128, 3, 2, 2)).astype(np.float32)
            buffer = io.BytesIO()
            np.savez(buffer, z=z)
            cache_zip.writestr(f"{key}.npz", buffer.getvalue())
            c2w, k = random_c2w(rng, count), np.array([80.0, 81.0, 47.5, 27.0], np.float32)
            ranges.append([sum(len(p) for p in poses), count])
            poses.append(c2w)
            intrinsics.append(np.tile(k, (count, 1)))
            truth[key] = dict(z=z, c2w=c2w, intrinsics=k, scale=1.0 + 0.5 * len(truth))
    np.savez(
        raw / "part0_camera.npz",
        ids=np.array(list(UPSTREAM_FRAMES)),
        ranges=np.array(ranges),
        pose=np.concatenate(poses),
        intrinsics=np.concatenate(intrinsics),
    )
    scales = {key: {"median": clip["scale"]} for key, clip in truth.items()}
    (raw / "part0_metric_scale_stats.json").write_text(json.dumps(scales))
    captions = [{"key": key, "prompt": f"sidecar caption of {key}"} for key in ("clip_a", "clip_b")]
    (raw / f"part0{CAPTION_SUFFIX}.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    (raw / "part0_dover.json").write_text(json.dumps({"clip_a": 0.9, "clip_b": 0.1}))
    return raw, cache, truth


def upstream_examples(upstream_dirs, **source_options) -> dict[str, dict]:
    raw, cache, _ = upstream_dirs
    source = UpstreamZipSource(raw, cache, **source_options)
    examples = single_examples(source, shuffle=False)
    return {str(example["key"]): example for example in examples}


def test_upstream_latents_become_channels_last(upstream_dirs):
    _, _, truth = upstream_dirs
    examples = upstream_examples(upstream_dirs)
    assert sorted(examples) == sorted(UPSTREAM_FRAMES)
    for key, example in examples.items():
        assert example["latents"].shape == (3, 2, 2, 128) and example["latents"].dtype == np.float32
        np.testing.assert_array_equal(example["latents"], truth[key]["z"].transpose(1, 2, 3, 0))


def test_upstream_translations_are_metric_scaled_before_relativising(upstream_dirs):
    _, _, truth = upstream_dirs
    for key, example in upstream_examples(upstream_dirs).items():
        c2w = truth[key]["c2w"][:17].astype(np.float64)
        c2w[:, :3, 3] *= truth[key]["scale"]
        np.testing.assert_allclose(example["c2w"], np.linalg.inv(c2w[0]) @ c2w, atol=1e-5)


def test_upstream_intrinsics_are_stretched_to_the_latent_frames(upstream_dirs):
    _, _, truth = upstream_dirs
    (source_h, source_w), (height, width) = UPSTREAM_SOURCE_SIZE, (64, 64)
    for key, example in upstream_examples(upstream_dirs).items():
        fx, fy, cx, cy = truth[key]["intrinsics"]
        expected = [fx * width / source_w, fy * height / source_h, cx * width / source_w, cy * height / source_h]
        np.testing.assert_allclose(example["intrinsics"], np.broadcast_to(expected, (17, 4)), atol=1e-4)


def test_upstream_intrinsics_can_follow_the_centre_crop(upstream_dirs):
    # 54x96 covering 64x64: scaled by 64/54 to 64x114 (rounded), 25 columns cropped on the left.
    _, _, truth = upstream_dirs
    scale_x, scale_y, left = 114 / 96, 64 / 54, 25
    for key, example in upstream_examples(upstream_dirs, intrinsics_mapping="center_crop").items():
        fx, fy, cx, cy = truth[key]["intrinsics"]
        expected = [fx * scale_x, fy * scale_y, cx * scale_x - left, cy * scale_y]
        np.testing.assert_allclose(example["intrinsics"], np.broadcast_to(expected, (17, 4)), atol=1e-4)


def test_upstream_camera_tensors_equal_prepare_camera(upstream_dirs):
    for example in upstream_examples(upstream_dirs).values():
        conditions, plucker = camera.prepare_camera(example["c2w"], example["intrinsics"], (64, 64))
        np.testing.assert_array_equal(example["camera_conditions"], np.asarray(conditions))
        np.testing.assert_array_equal(example["chunk_plucker"], np.asarray(plucker))


def test_upstream_captions_prefer_the_sidecar_over_the_json_prompt(upstream_dirs):
    captions = {key: str(e["caption"]) for key, e in upstream_examples(upstream_dirs).items()}
    assert captions == {
        "clip_a": "sidecar caption of clip_a",
        "clip_b": "sidecar caption of clip_b",
        "clip_c": "json prompt of clip_c",
    }


def test_upstream_score_filters_drop_clips_outside_bounds_or_unscored(upstream_dirs):
    raw, cache, _ = upstream_dirs
    source = UpstreamZipSource(raw, cache, score_filters={"_dover": (0.25, 1.0)})
    assert [entry.key for entry in source.entries] == ["clip_a"]
