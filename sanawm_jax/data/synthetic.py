"""Synthetic ground-truth clips: procedural walled scenes ray-cast along random smooth 6-DoF camera paths.

World axes follow OpenCV's camera convention at zero rotation: +x right, +y down (gravity), +z forward; the ground
is the plane y = 0 and cameras fly about 1.5 m above it (y < 0). Distances are metres. A scene is a ground plane
with a checker texture, four brick-textured walls of finite height around the path, spheres and boxes resting on the
ground, and a sky gradient above the walls. Pixels are shaded at their integer coordinates with exactly the pinhole
intrinsics that are stored, so a world point projects to the pixel it was drawn at.

    python -m sanawm_jax.data.synthetic --out DIR --num-clips 8 --frames 17 --height 64 --width 96 --seed 0

writes a clip directory of our format (`sanawm_jax.data.format`); the same arguments give identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np

from sanawm_jax.data import format as clip_format
from sanawm_jax.data.video import DEFAULT_FPS

PALETTE = {
    "red": (0.80, 0.15, 0.12),
    "orange": (0.90, 0.50, 0.10),
    "yellow": (0.90, 0.80, 0.20),
    "green": (0.20, 0.65, 0.25),
    "teal": (0.10, 0.55, 0.55),
    "blue": (0.15, 0.30, 0.80),
    "purple": (0.50, 0.25, 0.70),
    "white": (0.90, 0.90, 0.88),
    "grey": (0.50, 0.50, 0.52),
    "brown": (0.45, 0.30, 0.18),
}
SKY_HORIZON = np.array([0.75, 0.85, 0.95])
SKY_ZENITH = np.array([0.30, 0.50, 0.85])
LIGHT_DIRECTION = np.array([0.4, -0.8, 0.45]) / np.linalg.norm([0.4, -0.8, 0.45])  # towards the light
SKY, GROUND, FIRST_WALL, FIRST_OBJECT = 0, 1, 2, 6  # primitive ids: walls 2..5, then spheres, then boxes
MAX_RAYS_PER_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Scene:
    """Geometry and colours. Walls stand on the planes x = room_min[0], room_max[0], z = room_min[1], room_max[1]
    and reach up to y = -wall_height. Colour pairs (2, 3) in [0, 1] alternate in each surface's pattern."""

    room_min: tuple[float, float]
    room_max: tuple[float, float]
    wall_height: float
    ground_colors: np.ndarray  # (2, 3)
    ground_period: float
    wall_colors: np.ndarray  # (2, 3)
    brick_size: tuple[float, float]  # (length, height)
    sphere_centers: np.ndarray  # (S, 3)
    sphere_radii: np.ndarray  # (S,)
    sphere_colors: np.ndarray  # (S, 2, 3)
    box_min: np.ndarray  # (B, 3)
    box_max: np.ndarray  # (B, 3)
    box_colors: np.ndarray  # (B, 2, 3)
    caption: str = ""


@dataclasses.dataclass(frozen=True)
class Render:
    """rgb (F, H, W, 3) float in [0, 1]; depth (F, H, W) camera-frame z (inf for sky); primitive (F, H, W) ids."""

    rgb: np.ndarray
    depth: np.ndarray
    primitive: np.ndarray


# ---------------------------------------------------------------------------
# Ray casting
# ---------------------------------------------------------------------------


def camera_rays(c2w: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays through integer pixel coordinates: origins (F, 3) and world directions (F, H, W, 3) with unit
    camera-frame z, so a ray's parameter at a hit is the hit's depth."""
    fx, fy, cx, cy = (intrinsics[:, k, None, None] for k in range(4))
    x = (np.arange(width)[None, None, :] - cx) / fx
    y = (np.arange(height)[None, :, None] - cy) / fy
    x, y = np.broadcast_arrays(x, y)
    directions_cam = np.stack([x, y, np.ones_like(x)], axis=-1)
    return c2w[:, :3, 3], np.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], directions_cam)


def _checker(*coordinates: np.ndarray) -> np.ndarray:
    """Parity (0/1 int) of the sum of floored coordinates."""
    return sum(np.floor(c).astype(np.int64) for c in coordinates) % 2


def _ground_albedo(scene: Scene, points: np.ndarray) -> np.ndarray:
    x, z = points[:, 0] / scene.ground_period, points[:, 2] / scene.ground_period
    base = scene.ground_colors[_checker(x, z)]
    swirl = 0.85 + 0.15 * np.cos(2 * np.pi * x / 3.7) * np.cos(2 * np.pi * z / 2.9)
    return base * swirl[:, None]


def _wall_albedo(scene: Scene, points: np.ndarray, along: np.ndarray) -> np.ndarray:
    length, height = scene.brick_size
    row = np.floor(-points[:, 1] / height)
    u = along / length + 0.5 * (row % 2)
    base = scene.wall_colors[_checker(u, row)]
    v = -points[:, 1] / height
    mortar = (np.abs(u - np.round(u)) < 0.04) | (np.abs(v - np.round(v)) < 0.06)
    return base * np.where(mortar, 0.55, 1.0)[:, None]


def _sphere_albedo(colors: np.ndarray, normals: np.ndarray) -> np.ndarray:
    longitude = np.arctan2(normals[:, 0], normals[:, 2]) / (2 * np.pi) * 8
    latitude = np.arccos(np.clip(-normals[:, 1], -1, 1)) / np.pi * 4
    return colors[np.arange(len(colors)), _checker(longitude, latitude)]


def _box_albedo(colors: np.ndarray, points: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    cells = points / (sizes / 3.0)
    return colors[np.arange(len(colors)), _checker(cells[:, 0], cells[:, 1], cells[:, 2])]


def _nearest_sphere(scene: Scene, origins, directions) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit parameter (N,) (inf on a miss) and sphere index (N,) of each ray."""
    best_t, best = np.full(len(directions), np.inf), np.zeros(len(directions), np.int64)
    a = np.einsum("nk,nk->n", directions, directions)
    for index, (centre, radius) in enumerate(zip(scene.sphere_centers, scene.sphere_radii)):
        to_origin = origins - centre
        half_b = np.einsum("nk,nk->n", directions, to_origin)
        discriminant = half_b * half_b - a * (np.einsum("nk,nk->n", to_origin, to_origin) - radius * radius)
        t = (-half_b - np.sqrt(np.maximum(discriminant, 0))) / a
        closer = (discriminant >= 0) & (t > 0) & (t < best_t)
        best_t[closer], best[closer] = t[closer], index
    return best_t, best


def _nearest_box(scene: Scene, origins, directions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest positive hit parameter (N,) (inf on a miss), box index (N,) and face normal (N, 3) of each ray."""
    best_t, best = np.full(len(directions), np.inf), np.zeros(len(directions), np.int64)
    best_axis = np.zeros(len(directions), np.int64)
    inverse = (1.0 / directions).T  # (3, N): per-axis slabs avoid reductions over a length-3 axis
    origins = origins.T
    for index, (low, high) in enumerate(zip(scene.box_min, scene.box_max)):
        t_low, t_high = (low[:, None] - origins) * inverse, (high[:, None] - origins) * inverse
        t_near, t_far = np.minimum(t_low, t_high), np.maximum(t_low, t_high)
        t_enter = np.maximum(np.maximum(t_near[0], t_near[1]), t_near[2])
        t_exit = np.minimum(np.minimum(t_far[0], t_far[1]), t_far[2])
        closer = (t_exit >= t_enter) & (t_enter > 0) & (t_enter < best_t)
        best_t[closer], best[closer] = t_enter[closer], index
        best_axis[closer] = np.where(t_near[0] == t_enter, 0, np.where(t_near[1] == t_enter, 1, 2))[closer]
    rows = np.arange(len(directions))
    normals = np.zeros((len(directions), 3))
    normals[rows, best_axis] = -np.sign(directions[rows, best_axis])
    return best_t, best, normals


def _cast(scene: Scene, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """origins (N, 3), directions (N, 3) -> nearest hit parameter t (N,), primitive id (N,), normal (N, 3)."""
    n = len(directions)
    t_best = np.full(n, np.inf)
    prim = np.full(n, SKY, np.int64)
    normal = np.zeros((n, 3))
    eps = 1e-9

    def keep(t, ids, normals):
        closer = (t > eps) & (t < t_best)
        t_best[closer] = t[closer]
        prim[closer] = ids[closer] if np.ndim(ids) else ids
        normal[closer] = normals[closer] if np.ndim(normals) > 1 else normals

    with np.errstate(divide="ignore", invalid="ignore"):
        keep(np.where(directions[:, 1] > 0, -origins[:, 1] / directions[:, 1], np.inf), GROUND, np.array([0, -1, 0.0]))
        walls = [  # (axis, position, inward normal sign) in primitive-id order
            (0, scene.room_min[0], 1.0),
            (0, scene.room_max[0], -1.0),
            (2, scene.room_min[1], 1.0),
            (2, scene.room_max[1], -1.0),
        ]
        for offset, (axis, position, inward) in enumerate(walls):
            t = (position - origins[:, axis]) / directions[:, axis]
            y = origins[:, 1] + t * directions[:, 1]
            t = np.where((y >= -scene.wall_height) & (y <= 0), t, np.inf)
            wall_normal = np.zeros(3)
            wall_normal[axis] = inward
            keep(t, FIRST_WALL + offset, wall_normal)

        if len(scene.sphere_radii):
            t, index = _nearest_sphere(scene, origins, directions)
            hit_points = origins + t[:, None] * directions
            sphere_normals = (hit_points - scene.sphere_centers[index]) / scene.sphere_radii[index, None]
            keep(t, FIRST_OBJECT + index, sphere_normals)
        if len(scene.box_min):
            t, index, box_normals = _nearest_box(scene, origins, directions)
            keep(t, FIRST_OBJECT + len(scene.sphere_radii) + index, box_normals)
    return t_best, prim, normal


def _shade(scene: Scene, origins, directions, t, prim, normal) -> np.ndarray:
    """Lambert-shaded albedo with distance haze; sky gradient where nothing was hit."""
    points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    albedo = np.zeros_like(points)
    ground = prim == GROUND
    albedo[ground] = _ground_albedo(scene, points[ground])
    for offset, axis in enumerate((2, 2, 0, 0)):  # x-walls run along z, z-walls along x
        wall = prim == FIRST_WALL + offset
        albedo[wall] = _wall_albedo(scene, points[wall], points[wall, axis])
    num_spheres = len(scene.sphere_radii)
    sphere = (prim >= FIRST_OBJECT) & (prim < FIRST_OBJECT + num_spheres)
    albedo[sphere] = _sphere_albedo(scene.sphere_colors[prim[sphere] - FIRST_OBJECT], normal[sphere])
    box = prim >= FIRST_OBJECT + num_spheres
    box_index = prim[box] - FIRST_OBJECT - num_spheres
    sizes = scene.box_max[box_index] - scene.box_min[box_index]
    albedo[box] = _box_albedo(scene.box_colors[box_index], points[box] - scene.box_min[box_index], sizes)

    lit = albedo * (0.45 + 0.55 * np.clip(normal @ LIGHT_DIRECTION, 0, None))[:, None]
    distance = np.where(np.isfinite(t), t * np.linalg.norm(directions, axis=-1), 0.0)
    haze = (1 - np.exp(-distance / 40.0))[:, None]
    elevation = np.clip(-directions[:, 1] / np.linalg.norm(directions, axis=-1), 0, 1)[:, None]
    sky = SKY_HORIZON * (1 - elevation) + SKY_ZENITH * elevation
    return np.where((prim == SKY)[:, None], sky, lit * (1 - haze) + SKY_HORIZON * haze)


def render(scene: Scene, c2w: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> Render:
    """Ray-cast a scene from cameras c2w (F, 4, 4) with intrinsics (F, 4) [fx, fy, cx, cy] at (height, width)."""
    c2w, intrinsics = np.asarray(c2w, np.float64), np.asarray(intrinsics, np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or intrinsics.shape != (len(c2w), 4):
        raise ValueError(f"need c2w (F, 4, 4) and intrinsics (F, 4), got {c2w.shape} and {intrinsics.shape}")
    frames_per_chunk = max(1, MAX_RAYS_PER_CHUNK // (height * width))
    rgb, depth, primitive = [], [], []
    for first in range(0, len(c2w), frames_per_chunk):
        chunk = slice(first, first + frames_per_chunk)
        origins, directions = camera_rays(c2w[chunk], intrinsics[chunk], height, width)
        shape = directions.shape[:-1]
        origins = np.broadcast_to(origins[:, None, None, :], directions.shape).reshape(-1, 3)
        directions = directions.reshape(-1, 3)
        t, prim, normal = _cast(scene, origins, directions)
        rgb.append(_shade(scene, origins, directions, t, prim, normal).reshape(*shape, 3))
        depth.append(t.reshape(shape))
        primitive.append(prim.reshape(shape))
    return Render(np.concatenate(rgb).astype(np.float32), np.concatenate(depth), np.concatenate(primitive))


# ---------------------------------------------------------------------------
# Random trajectories, intrinsics and scenes
# ---------------------------------------------------------------------------


def rotation_yaw_pitch_roll(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(F,) radians -> (F, 3, 3) camera-to-world rotations R_y(yaw) . R_x(pitch) . R_z(roll); with y down, positive
    yaw turns the view right, positive pitch tilts it down and positive roll turns the image clockwise."""
    c, s = np.cos, np.sin
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)

    def stack(rows):
        return np.stack([np.stack(row, -1) for row in rows], -2)

    r_yaw = stack([[c(yaw), zero, s(yaw)], [zero, one, zero], [-s(yaw), zero, c(yaw)]])
    r_pitch = stack([[one, zero, zero], [zero, c(pitch), s(pitch)], [zero, -s(pitch), c(pitch)]])
    r_roll = stack([[c(roll), -s(roll), zero], [s(roll), c(roll), zero], [zero, zero, one]])
    return r_yaw @ r_pitch @ r_roll


def random_trajectory(rng: np.random.Generator, num_frames: int, fps: float = DEFAULT_FPS) -> np.ndarray:
    """A smooth walk (F, 4, 4) c2w: 0.4-1.2 m/s along a slowly turning heading, eye height 1.2-1.8 m with a small
    bob, the view yawing around the heading, tilted slightly down, pitching and rolling gently (sinusoids)."""
    substeps = 8
    time = np.arange((num_frames - 1) * substeps + 1) / (fps * substeps)
    speed = rng.uniform(0.4, 1.2)
    heading = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.5, 0.5) * time
    heading = heading + rng.uniform(0.0, 0.6) * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * time)
    velocity = speed * np.stack([np.sin(heading), np.zeros_like(heading), np.cos(heading)], -1)
    steps = np.concatenate([np.zeros((1, 3)), velocity[1:] / (fps * substeps)])
    position = np.cumsum(steps, axis=0)[::substeps]
    time, heading = time[::substeps], heading[::substeps]
    position[:, 1] = -rng.uniform(1.2, 1.8) + 0.03 * np.sin(2 * np.pi * 1.8 * time + rng.uniform(0, 2 * np.pi))

    def wobble(amplitude_deg, max_frequency):
        amplitude = math.radians(rng.uniform(-amplitude_deg, amplitude_deg))
        return amplitude * np.sin(2 * np.pi * rng.uniform(0.05, max_frequency) * time + rng.uniform(0, 2 * np.pi))

    yaw = heading + wobble(25, 0.4)
    pitch = math.radians(rng.uniform(-4, 12)) + wobble(6, 0.5)
    roll = wobble(4, 0.5)
    c2w = np.tile(np.eye(4), (num_frames, 1, 1))
    c2w[:, :3, :3] = rotation_yaw_pitch_roll(yaw, pitch, roll)
    c2w[:, :3, 3] = position
    return c2w


def random_intrinsics(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(4,) [fx, fy, cx, cy]: square pixels, horizontal field of view 55-85 degrees, principal point at the centre
    of the pixel grid ((W-1)/2, (H-1)/2)."""
    focal = (width / 2) / math.tan(math.radians(rng.uniform(55, 85)) / 2)
    return np.array([focal, focal, (width - 1) / 2, (height - 1) / 2])


def _object_positions(rng, count, size_range, c2w, room_min, room_max, clearance=0.7) -> list[tuple[np.ndarray, float]]:
    """(centre on the ground (x, z), size) pairs in view of random path frames, clear of the path and the walls."""
    path = c2w[:, [0, 2], 3]
    placed = []
    for _ in range(count * 30):
        if len(placed) == count:
            break
        size = rng.uniform(*size_range)
        frame = rng.integers(len(c2w))
        forward = c2w[frame, [0, 2], 2]
        angle = math.atan2(forward[0], forward[1]) + rng.uniform(-0.7, 0.7)
        centre = path[frame] + rng.uniform(2.0, 8.0) * np.array([math.sin(angle), math.cos(angle)])
        inside = np.all(centre - size > room_min) and np.all(centre + size < room_max)
        clear_of_path = np.min(np.linalg.norm(path - centre, axis=1)) > size * 1.5 + clearance
        clear_of_objects = all(np.linalg.norm(centre - c) > (size + s) * 1.5 for c, s in placed)
        if inside and clear_of_path and clear_of_objects:
            placed.append((centre, size))
    return placed


def _count_phrase(count: int, singular: str, plural: str) -> str:
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]
    return f"{words[count] if count < len(words) else count} {singular if count == 1 else plural}"


def random_scene(rng: np.random.Generator, c2w: np.ndarray) -> Scene:
    """Walls 6-14 m beyond the path, 2-6 balls and 1-4 boxes placed where the path looks, random palette colours."""
    path = c2w[:, [0, 2], 3]
    room_min = path.min(0) - rng.uniform(6, 14, size=2)
    room_max = path.max(0) + rng.uniform(6, 14, size=2)
    names = list(PALETTE)

    def color_pair():
        first, second = rng.choice(len(names), size=2, replace=False)
        return names[first], np.array([PALETTE[names[first]], PALETTE[names[second]]])

    ground_name, ground_colors = color_pair()
    wall_name, wall_colors = color_pair()
    spheres = _object_positions(rng, int(rng.integers(2, 7)), (0.3, 0.9), c2w, room_min, room_max)
    boxes = _object_positions(rng, int(rng.integers(1, 5)), (0.3, 0.8), c2w, room_min, room_max)
    sphere_colors = np.array([color_pair()[1] for _ in spheres]).reshape(-1, 2, 3)
    box_colors = np.array([color_pair()[1] for _ in boxes]).reshape(-1, 2, 3)
    box_heights = np.array([rng.uniform(0.5, 2.0) * size for _, size in boxes])
    box_min = np.array([[c[0] - s, -h, c[1] - s] for (c, s), h in zip(boxes, box_heights)]).reshape(-1, 3)
    box_max = np.array([[c[0] + s, 0.0, c[1] + s] for (c, s), _ in zip(boxes, box_heights)]).reshape(-1, 3)
    objects = f"{_count_phrase(len(spheres), 'ball', 'balls')} and {_count_phrase(len(boxes), 'box', 'boxes')}"
    caption = (
        f"A first-person walk through a walled courtyard with {wall_name} brick walls and a {ground_name} "
        f"checkered floor, passing {objects}."
    )
    return Scene(
        room_min=tuple(room_min),
        room_max=tuple(room_max),
        wall_height=float(rng.uniform(2.0, 4.0)),
        ground_colors=ground_colors,
        ground_period=float(rng.uniform(0.5, 1.5)),
        wall_colors=wall_colors,
        brick_size=(float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.15, 0.35))),
        sphere_centers=np.array([[c[0], -s, c[1]] for c, s in spheres]).reshape(-1, 3),
        sphere_radii=np.array([s for _, s in spheres]),
        sphere_colors=sphere_colors,
        box_min=box_min,
        box_max=box_max,
        box_colors=box_colors,
        caption=caption,
    )


@dataclasses.dataclass(frozen=True)
class SyntheticClip:
    """A generated clip: its scene, c2w (F, 4, 4) metric poses, intrinsics (F, 4) in pixels of (height, width)."""

    key: str
    scene: Scene
    c2w: np.ndarray
    intrinsics: np.ndarray
    height: int
    width: int

    def render(self) -> Render:
        return render(self.scene, self.c2w, self.intrinsics, self.height, self.width)


def generate_clip(seed: int, index: int, num_frames: int, height: int, width: int, fps: float = DEFAULT_FPS):
    """Clip `index` of the synthetic set `seed`: a function of its arguments only."""
    rng = np.random.default_rng([seed, index])
    c2w = random_trajectory(rng, num_frames, fps)
    intrinsics = np.tile(random_intrinsics(rng, height, width), (num_frames, 1))
    return SyntheticClip(f"scene_{index:05d}", random_scene(rng, c2w), c2w, intrinsics, height, width)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def write_synthetic_dataset(
    out: str | Path, num_clips: int, num_frames: int, height: int, width: int, seed: int = 0, fps: float = DEFAULT_FPS
) -> list[clip_format.ClipMetadata]:
    """Render `num_clips` clips into a clip directory at `out` (videos H.264 yuv444p, crf 10; metric poses)."""
    if num_clips < 1 or num_frames < 1 or height < 2 or width < 2:
        raise ValueError(
            f"need num_clips >= 1, num_frames >= 1 and frames of at least 2x2, "
            f"got {num_clips}, {num_frames}, {height}x{width}"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    clips = []
    for index in range(num_clips):
        clip = generate_clip(seed, index, num_frames, height, width, fps)
        frames = to_uint8(clip.render().rgb)
        clips.append(
            clip_format.write_clip(
                out,
                clip.key,
                c2w=clip.c2w,
                intrinsics=clip.intrinsics,
                caption=clip.scene.caption,
                frames=frames,
                fps=fps,
                pix_fmt="yuv444p",
            )
        )
    clip_format.write_index(out, clips)
    return clips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output clip directory")
    parser.add_argument("--num-clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS)
    args = parser.parse_args(argv)
    clips = write_synthetic_dataset(args.out, args.num_clips, args.frames, args.height, args.width, args.seed, args.fps)
    print(f"wrote {len(clips)} clips of {args.frames} frames at {args.height}x{args.width} to {args.out}")


if __name__ == "__main__":
    main()
