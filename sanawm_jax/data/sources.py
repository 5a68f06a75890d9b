"""Random-access sources of pose-annotated clips (grain `RandomAccessDataSource`s) for both on-disk layouts.

A source yields a `ClipRecord` per index: the clip's caption, camera and sizes, with its pixels (video or cached
latents) left on disk until the loader picks a temporal window. A source raises `BadClipError` when a clip cannot be
described at all (missing camera, unreadable metadata); the loader checks everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import threading
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sanawm_jax.data import format as clip_format

INPUTS = ("video", "latents")
INTRINSICS_MAPPINGS = ("center_crop", "stretch")
UPSTREAM_CAPTION_SUFFIXES = ("_LongSceneStaticCaption-Qwen3-VL-30B-A3B-Instruct",)
UPSTREAM_SPATIAL_STRIDE = 32


class BadClipError(ValueError):
    """A clip whose data cannot be used as it is; `reason` says why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"clip {key!r}: {reason}")
        self.key = key
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class LatentFile:
    """Where a clip's cached latents are: an .npz file or an .npz entry (`member`) of a zip archive.

    `channels_first` marks arrays stored (C, T, h, w); without a stored `pixel_size` the encoded frame size is the
    latent size times `spatial_stride`.
    """

    path: str
    member: str | None = None
    array: str = "latents"
    channels_first: bool = False
    spatial_stride: int | None = None

    def read(self) -> tuple[np.ndarray, tuple[int, int]]:
        """(latents (T, h, w, C) float32, (H, W) size of the encoded frames)."""
        if self.member is None:
            data = Path(self.path).read_bytes()
        else:
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read(self.member)
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            latents = stored[self.array].astype(np.float32)
            stored_size = stored["pixel_size"] if "pixel_size" in stored.files else None
        if latents.ndim != 4:
            raise ValueError(f"latents must have 4 dimensions, got {latents.shape}")
        if self.channels_first:
            latents = latents.transpose(1, 2, 3, 0)
        if stored_size is not None:
            return latents, (int(stored_size[0]), int(stored_size[1]))
        if self.spatial_stride is None:
            raise ValueError(f"{self.path}: latents store no pixel_size and no spatial stride is given")
        return latents, (latents.shape[1] * self.spatial_stride, latents.shape[2] * self.spatial_stride)


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """A clip as described on disk.

    c2w (N, 4, 4) and intrinsics (N, 4) [fx, fy, cx, cy] are as stored: translations before metric scaling,
    intrinsics in pixels of `source_size` (H, W). `num_frames` is the length of the video the poses annotate.
    `intrinsics_mapping` says how frames of another size were made from the source: "center_crop" (resize to cover,
    centre crop, as the sampler does) or "stretch" (plain per-axis scaling).
    """

    key: str
    caption: str | None
    c2w: np.ndarray
    intrinsics: np.ndarray
    source_size: tuple[int, int]
    num_frames: int
    metric_scale: float = 1.0
    video: str | None = None
    latents: LatentFile | None = None
    intrinsics_mapping: str = "center_crop"


class ClipDirectorySource:
    """Clips of our format (`sanawm_jax.data.format`); `inputs` picks decoded videos or cached latents."""

    def __init__(self, root: str | Path, inputs: str = "video"):
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        self.root = Path(root)
        self.inputs = inputs
        self.clips = clip_format.read_index(self.root)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> ClipRecord:
        clip = self.clips[index]
        path = clip_format.camera_path(self.root, clip.key)
        if not path.is_file():
            raise BadClipError(clip.key, f"camera file {path} is missing")
        with np.load(path, allow_pickle=False) as camera:
            c2w, intrinsics = camera["c2w"], camera["intrinsics"]
        video = latents = None
        if self.inputs == "video":
            if clip.video is None:
                raise BadClipError(clip.key, "has no video")
            video = str(self.root / clip.video)
        else:
            if clip.latents is None:
                raise BadClipError(clip.key, "has no cached latents")
            latents = LatentFile(str(self.root / clip.latents))
        return ClipRecord(
            key=clip.key,
            caption=clip.caption,
            c2w=c2w,
            intrinsics=intrinsics,
            source_size=(clip.height, clip.width),
            num_frames=clip.num_frames,
            metric_scale=clip.metric_scale,
            video=video,
            latents=latents,
        )

    def __repr__(self) -> str:
        return f"ClipDirectorySource({str(self.root)!r}, inputs={self.inputs!r}, {len(self)} clips)"


@dataclasses.dataclass(frozen=True)
class _UpstreamEntry:
    key: str
    raw_zip: str
    json_name: str
    latent_zip: str
    latent_name: str


class UpstreamZipSource:
    """Clips in the layout of NVlabs/Sana's `SanaWMZipLatentDataset` (UPSTREAM_NOTES.md §6.1).

    raw_dir holds `<stem>.zip` archives of `<key>.json` (`prompt`, `width`, `height` of the capture) with sidecars
    `<stem>_camera.npz` (ids, ranges [start, count], pose (ΣN, 4, 4) c2w, intrinsics (ΣN, 4) in capture pixels),
    `<stem>_metric_scale_stats.json` ({key: {"median": s}}) and caption sidecars `<stem><suffix>.json[l]`.
    latent_dir holds `<stem>.zip` archives of `<key>.npz` with `z` (C, T, h, w).

    The caption is the first sidecar caption found in `caption_suffixes` order, else the json `prompt`.
    `score_filters` maps a sidecar suffix to (min, max): clips whose score is missing or outside are dropped, as
    upstream does. Intrinsics map to the latent grid by `intrinsics_mapping`; upstream training scaled them per axis
    ("stretch"), ignoring the offline crop.
    """

    def __init__(
        self,
        raw_dir: str | Path,
        latent_dir: str | Path,
        *,
        caption_suffixes: Sequence[str] = UPSTREAM_CAPTION_SUFFIXES,
        score_filters: Mapping[str, tuple[float, float]] | None = None,
        intrinsics_mapping: str = "stretch",
        spatial_stride: int = UPSTREAM_SPATIAL_STRIDE,
    ):
        if intrinsics_mapping not in INTRINSICS_MAPPINGS:
            raise ValueError(f"intrinsics_mapping must be one of {INTRINSICS_MAPPINGS}, got {intrinsics_mapping!r}")
        self.caption_suffixes = tuple(caption_suffixes)
        self.intrinsics_mapping = intrinsics_mapping
        self.spatial_stride = spatial_stride
        self._lock = threading.Lock()
        self._camera_sidecar = functools.lru_cache(maxsize=4)(_load_camera_sidecar)
        self._json_sidecar = functools.lru_cache(maxsize=64)(_load_json_sidecar)
        self.entries: list[_UpstreamEntry] = []
        raw_zips = sorted(Path(raw_dir).glob("*.zip"))
        if not raw_zips:
            raise ValueError(f"no *.zip archives in {raw_dir}")
        for raw_zip in raw_zips:
            latent_zip = Path(latent_dir) / raw_zip.name
            if latent_zip.is_file():
                self.entries.extend(self._paired_entries(raw_zip, latent_zip, score_filters or {}))

    def _paired_entries(self, raw_zip: Path, latent_zip: Path, score_filters) -> list[_UpstreamEntry]:
        with zipfile.ZipFile(raw_zip) as raw, zipfile.ZipFile(latent_zip) as cache:
            latent_names = {name[: -len(".npz")]: name for name in cache.namelist() if name.endswith(".npz")}
            json_names = sorted(name for name in raw.namelist() if name.endswith(".json"))
        entries = []
        for json_name in json_names:
            key = json_name[: -len(".json")]
            if key in latent_names and self._passes_filters(raw_zip, key, score_filters):
                entries.append(_UpstreamEntry(key, str(raw_zip), json_name, str(latent_zip), latent_names[key]))
        return entries

    def _passes_filters(self, raw_zip: Path, key: str, score_filters) -> bool:
        for suffix, (low, high) in score_filters.items():
            score = _numeric_score(self._sidecar(str(raw_zip), suffix).get(key))
            if score is None or not low <= score <= high:
                return False
        return True

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> ClipRecord:
        entry = self.entries[index]
        try:
            with zipfile.ZipFile(entry.raw_zip) as raw:
                info = json.loads(raw.read(entry.json_name).decode("utf-8"))
            source_size = (int(info["height"]), int(info["width"]))
        except (KeyError, ValueError, TypeError, OSError) as error:
            raise BadClipError(entry.key, f"clip json has no usable width/height: {error!r}") from error
        c2w, intrinsics = self._camera(entry)
        return ClipRecord(
            key=entry.key,
            caption=self._caption(entry, info),
            c2w=c2w,
            intrinsics=intrinsics,
            source_size=source_size,
            num_frames=len(c2w),
            metric_scale=self._metric_scale(entry),
            latents=LatentFile(
                entry.latent_zip, entry.latent_name, "z", channels_first=True, spatial_stride=self.spatial_stride
            ),
            intrinsics_mapping=self.intrinsics_mapping,
        )

    def _camera(self, entry: _UpstreamEntry) -> tuple[np.ndarray, np.ndarray]:
        sidecar = _sidecar_stem(entry.raw_zip) + "_camera.npz"
        with self._lock:
            camera = self._camera_sidecar(sidecar)
        if camera is None:
            raise BadClipError(entry.key, f"camera sidecar {sidecar} is missing")
        row = camera["rows"].get(entry.key)
        if row is None:
            raise BadClipError(entry.key, f"camera sidecar {sidecar} has no poses for this clip")
        start, count = (int(v) for v in camera["ranges"][row])
        intrinsics = camera["intrinsics"][start : start + count]
        if intrinsics.ndim == 3 and intrinsics.shape[1:] == (3, 3):
            intrinsics = intrinsics[:, [0, 1, 0, 1], [0, 1, 2, 2]]
        return camera["pose"][start : start + count], intrinsics

    def _metric_scale(self, entry: _UpstreamEntry) -> float:
        stats = self._sidecar(entry.raw_zip, "_metric_scale_stats")
        if entry.key not in stats:
            return 1.0
        score = _numeric_score(stats[entry.key])
        return float("nan") if score is None else score

    def _caption(self, entry: _UpstreamEntry, info: dict) -> str | None:
        for suffix in self.caption_suffixes:
            value = self._sidecar(entry.raw_zip, suffix).get(entry.key)
            if isinstance(value, dict):
                value = value.get("prompt", next((v for v in value.values() if isinstance(v, str)), None))
            if isinstance(value, str) and value:
                return value
        prompt = info.get("prompt")
        return prompt if isinstance(prompt, str) else None

    def _sidecar(self, raw_zip: str, suffix: str) -> dict:
        with self._lock:
            return self._json_sidecar(_sidecar_stem(raw_zip) + suffix)

    def __repr__(self) -> str:
        return f"UpstreamZipSource({len(self)} clips, intrinsics_mapping={self.intrinsics_mapping!r})"


def _sidecar_stem(raw_zip: str) -> str:
    return str(Path(raw_zip).with_suffix(""))


def _load_camera_sidecar(path: str) -> dict | None:
    """The arrays of a `<stem>_camera.npz` in memory, with `rows` mapping clip key -> row of `ranges`."""
    if not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as camera:
        arrays = {name: camera[name] for name in ("ids", "ranges", "pose", "intrinsics")}
    arrays["rows"] = {str(key): row for row, key in enumerate(arrays["ids"].tolist())}
    return arrays


def _load_json_sidecar(stem: str) -> dict:
    """{key: value} from `<stem>.json` (a dict, or a list of objects with "key") or `<stem>.jsonl`; {} if absent."""
    json_path, jsonl_path = Path(stem + ".json"), Path(stem + ".jsonl")
    if json_path.is_file():
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return {str(item["key"]): item for item in data if isinstance(item, dict) and "key" in item}
        return data if isinstance(data, dict) else {}
    if jsonl_path.is_file():
        items = (json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines() if line.strip())
        return {str(item["key"]): item for item in items if isinstance(item, dict) and "key" in item}
    return {}


def _numeric_score(value) -> float | None:
    """A number from a sidecar value: the value itself, the mean of a list, or a dict's "median"/"score" entry."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        numbers = [float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(numbers) / len(numbers) if numbers else None
    if isinstance(value, dict):
        for name in ("median", "score"):
            if name in value:
                return _numeric_score(value[name])
        return next((s for s in map(_numeric_score, value.values()) if s is not None), None)
    return None
