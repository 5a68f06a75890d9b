"""Bad clips are either rejected (logged, counted, skipped) or raise, by `DataConfig.on_bad_clip`; never loaded with a
wrong camera. Each case pairs one good clip with one broken clip."""

import io
import json
import logging
import re
import shutil
import zipfile

import numpy as np
import pytest

from sanawm_jax.data import format as clip_format
from sanawm_jax.data import synthetic
from sanawm_jax.data.pipeline import DataConfig, RejectedClips, make_dataset
from sanawm_jax.data.sources import BadClipError, ClipDirectorySource, UpstreamZipSource

FRAMES, SIZE = 9, 32


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_clips")
    synthetic.write_synthetic_dataset(root, 2, FRAMES, SIZE, SIZE, seed=2)
    return root


def corrupt_video(root):
    (root / "videos" / "scene_00001.mp4").write_bytes(b"not an mp4 file")


def drop_last_pose(root):
    path = clip_format.camera_path(root, "scene_00001")
    camera = dict(np.load(path))
    np.savez(path, c2w=camera["c2w"][:-1], intrinsics=camera["intrinsics"][:-1])


def video_longer_than_poses(root):
    drop_last_pose(root)
    clips = clip_format.read_index(root)
    clips[1] = clip_format.ClipMetadata(**{**clips[1].__dict__, "num_frames": FRAMES - 1})
    clip_format.write_index(root, clips)


def nan_pose(root):
    path = clip_format.camera_path(root, "scene_00001")
    camera = dict(np.load(path))
    camera["c2w"][3, 0, 3] = np.nan
    np.savez(path, **camera)


def scaled_rotation(root):
    path = clip_format.camera_path(root, "scene_00001")
    camera = dict(np.load(path))
    camera["c2w"][5, :3, :3] *= 1.1
    np.savez(path, **camera)


def missing_caption(root):
    clips = clip_format.read_index(root)
    clips[1] = clip_format.ClipMetadata(**{**clips[1].__dict__, "caption": None})
    clip_format.write_index(root, clips)


def missing_camera(root):
    clip_format.camera_path(root, "scene_00001").unlink()


CASES = {
    "corrupt video": (corrupt_video, "cannot decode video"),
    "fewer poses than frames": (drop_last_pose, "8 poses and 8 intrinsics rows for a clip of 9 frames"),
    "video longer than its poses": (video_longer_than_poses, "video has 9 frames but the camera has 8 poses"),
    "NaN pose": (nan_pose, "NaN or infinite"),
    "non-rigid pose": (scaled_rotation, "not rigid transforms"),
    "missing caption": (missing_caption, "caption is missing"),
    "missing camera": (missing_camera, "camera file .* is missing"),
}


@pytest.fixture(params=list(CASES))
def broken(request, two_clips, tmp_path):
    root = tmp_path / "clips"
    shutil.copytree(two_clips, root)
    damage, reason = CASES[request.param]
    damage(root)
    return ClipDirectorySource(root), reason


def window_config(policy: str) -> DataConfig:
    """One-frame windows, which every clip is long enough for."""
    return DataConfig(
        num_frames=1, target_size=(SIZE, SIZE), batch_size=1, num_epochs=1, shuffle=False, on_bad_clip=policy
    )


def test_reject_skips_logs_and_counts_the_bad_clip(broken, caplog):
    source, reason = broken
    rejected = RejectedClips()
    dataset = make_dataset(source, window_config("reject"), rejected=rejected, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="sanawm_jax.data.pipeline"):
        keys = [str(batch["key"][0]) for batch in iter(dataset)]
    assert keys == ["scene_00000"]
    assert rejected.count == 1
    assert list(rejected.reasons()) == ["scene_00001"]
    assert re.search(reason, rejected.reasons()["scene_00001"])
    assert "scene_00001" in caplog.text


def test_raise_policy_raises_bad_clip_error(broken):
    source, reason = broken
    dataset = make_dataset(source, window_config("raise"), process_index=0, process_count=1)
    with pytest.raises(BadClipError, match=reason):
        list(iter(dataset))


def test_upstream_clip_without_camera_entry_is_rejected(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "latents"
    raw.mkdir()
    cache.mkdir()
    with zipfile.ZipFile(raw / "part.zip", "w") as raw_zip, zipfile.ZipFile(cache / "part.zip", "w") as cache_zip:
        for key in ("with_camera", "without_camera"):
            raw_zip.writestr(f"{key}.json", json.dumps({"prompt": "a street", "height": 32, "width": 32}))
            buffer = io.BytesIO()
            np.savez(buffer, z=np.zeros((128, 2, 1, 1), np.float32))
            cache_zip.writestr(f"{key}.npz", buffer.getvalue())
    np.savez(
        raw / "part_camera.npz",
        ids=np.array(["with_camera"]),
        ranges=np.array([[0, FRAMES]]),
        pose=np.tile(np.eye(4, dtype=np.float32), (FRAMES, 1, 1)),
        intrinsics=np.tile(np.array([30.0, 30.0, 16.0, 16.0], np.float32), (FRAMES, 1)),
    )
    rejected = RejectedClips()
    dataset = make_dataset(
        UpstreamZipSource(raw, cache), window_config("reject"), rejected=rejected, process_index=0, process_count=1
    )
    assert [str(batch["key"][0]) for batch in iter(dataset)] == ["with_camera"]
    assert "has no poses for this clip" in rejected.reasons()["without_camera"]
