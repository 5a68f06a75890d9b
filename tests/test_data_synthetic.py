"""Synthetic ground-truth scenes: geometry agrees with the stored cameras, output is deterministic, rendering is fast.

Tolerances: the projection check allows 0.5 px (the acceptance bound); the centroid of a rasterised disc of ~4 px
radius sits within ~0.1 px of its centre and the perspective shift of a sphere's outline is below 0.15 px here.
Trajectories are built in float64, so their rotations are orthonormal to 1e-6 with a wide margin.
"""

import dataclasses
import filecmp
import time
from pathlib import Path

import numpy as np

from sanawm_jax.data import format as clip_format
from sanawm_jax.data import synthetic
from sanawm_jax.data.sources import ClipDirectorySource

FRAMES, HEIGHT, WIDTH = 17, 64, 96


def marker_scene(clip: synthetic.SyntheticClip, distance: float = 4.0, radius: float = 0.2) -> synthetic.Scene:
    """The clip's room with a single sphere floating `distance` m ahead of the middle frame's camera."""
    middle = clip.c2w[len(clip.c2w) // 2]
    centre = middle[:3, 3] + distance * middle[:3, 2]
    return dataclasses.replace(
        clip.scene,
        sphere_centers=centre[None],
        sphere_radii=np.array([radius]),
        sphere_colors=np.array([[[1.0, 0.0, 0.0], [0.9, 0.1, 0.1]]]),
        box_min=np.zeros((0, 3)),
        box_max=np.zeros((0, 3)),
        box_colors=np.zeros((0, 2, 3)),
    )


def test_projected_point_lands_on_the_pixels_the_renderer_drew_it_at(tmp_path):
    clip = synthetic.generate_clip(seed=3, index=0, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    scene = marker_scene(clip)
    drawn = synthetic.render(scene, clip.c2w, clip.intrinsics, HEIGHT, WIDTH)
    frames = synthetic.to_uint8(drawn.rgb)
    metadata = clip_format.write_clip(
        tmp_path, clip.key, c2w=clip.c2w, intrinsics=clip.intrinsics, caption="marker", frames=frames
    )
    clip_format.write_index(tmp_path, [metadata])
    stored = ClipDirectorySource(tmp_path)[0]

    errors = []
    for frame in range(FRAMES):
        rows, cols = np.nonzero(drawn.primitive[frame] == synthetic.FIRST_OBJECT)
        if len(rows) < 12 or rows.min() == 0 or cols.min() == 0 or rows.max() == HEIGHT - 1 or cols.max() == WIDTH - 1:
            continue
        c2w = stored.c2w[frame].astype(np.float64)
        fx, fy, cx, cy = stored.intrinsics[frame].astype(np.float64)
        point = np.linalg.inv(c2w) @ np.append(scene.sphere_centers[0], 1.0)
        projected = np.array([fx * point[0] / point[2] + cx, fy * point[1] / point[2] + cy])
        errors.append(np.abs(projected - [cols.mean(), rows.mean()]).max())
    assert len(errors) >= FRAMES // 2
    assert max(errors) <= 0.5


def test_same_seed_writes_identical_files(tmp_path):
    first = synthetic.write_synthetic_dataset(tmp_path / "a", 2, 9, 32, 48, seed=7)
    second = synthetic.write_synthetic_dataset(tmp_path / "b", 2, 9, 32, 48, seed=7)
    assert first == second
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5  # index, 2 videos, 2 cameras
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_different_seeds_give_different_clips():
    first = synthetic.generate_clip(seed=0, index=0, num_frames=9, height=32, width=48)
    second = synthetic.generate_clip(seed=1, index=0, num_frames=9, height=32, width=48)
    assert not np.allclose(first.c2w, second.c2w)
    assert not np.allclose(first.render().rgb, second.render().rgb)


def test_rendering_17_frames_at_64x96_takes_under_a_second_of_cpu():
    clip = synthetic.generate_clip(seed=0, index=1, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    start = time.process_time()
    rendered = clip.render()
    assert time.process_time() - start < 1.0
    assert rendered.rgb.shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_trajectories_are_rigid_and_metric():
    clip = synthetic.generate_clip(seed=5, index=2, num_frames=33, height=HEIGHT, width=WIDTH)
    rotations = clip.c2w[:, :3, :3]
    identity = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), identity, atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-6)
    eye_height = -clip.c2w[:, 1, 3]
    assert np.all((eye_height > 1.1) & (eye_height < 1.9))  # metres above the ground plane y = 0
    step = np.linalg.norm(np.diff(clip.c2w[:, [0, 2], 3], axis=0), axis=1)
    assert np.all(step < 1.3 / synthetic.DEFAULT_FPS)  # walking pace, at most 1.2 m/s


def test_cli_writes_a_loadable_clip_directory(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--num-clips", "2", "--frames", "9", "--height", "32", "--width", "48"])
    source = ClipDirectorySource(tmp_path)
    record = source[1]
    assert len(source) == 2 and record.c2w.shape == (9, 4, 4) and record.source_size == (32, 48)
    assert record.caption.startswith("A first-person walk")
    assert Path(record.video).is_file()
