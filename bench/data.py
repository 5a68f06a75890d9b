"""Throughput of the grain loader (clips/s) on decoded videos and on cached latents.

    python bench/data.py --clips 16 --frames 33 --source 144 256 --target 128 224

Videos: synthetic clips rendered at --source and stored as H.264, loaded with random --frames windows, resized and
centre-cropped to --target. Latents: the same clips cached at --target by a pooling stand-in encoder. With
--latent-frames N (e.g. 961) the latent run instead uses clips of N poses and (N-1)/8+1 latent frames of the full
720p grid (22x40x128, random float16), the shape of upstream training data. Every example also gets its camera
tensors. The first batch (JIT compilation of the camera code) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import machine_state, report_machine

from sanawm_jax.data import cache, synthetic
from sanawm_jax.data import format as clip_format
from sanawm_jax.data.pipeline import DataConfig, make_dataset
from sanawm_jax.data.sources import ClipDirectorySource


def pooling_encoder(video: np.ndarray) -> np.ndarray:
    """(8k+1, H, W, 3) -> (k+1, H/32, W/32, 128): every 8th frame, 32x32 mean, mixed to 128 channels."""
    _, height, width, _ = video.shape
    pooled = video[::8].reshape(-1, height // 32, 32, width // 32, 32, 3).mean(axis=(2, 4))
    return pooled @ np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)


def write_720p_latent_clips(root: Path, clips: int, frames: int) -> None:
    """Clips of `frames` metric poses and float16 latents (T, 22, 40, 128) encoding 704x1280 frames."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    metadata = []
    for index in range(clips):
        key = f"latent_{index:05d}"
        c2w = synthetic.random_trajectory(rng, frames)
        intrinsics = np.tile(synthetic.random_intrinsics(rng, 1080, 1920), (frames, 1))
        clip_format.write_camera(root, key, c2w, intrinsics)
        latents = rng.normal(size=((frames - 1) // 8 + 1, 22, 40, 128)).astype(np.float16)
        path = clip_format.write_latents(root, key, latents, (704, 1280))
        metadata.append(clip_format.ClipMetadata(key, f"clip {index}", frames, 1080, 1920, latents=path))
    clip_format.write_index(root, metadata)


def clips_per_second(source, config: DataConfig, epochs: int) -> tuple[float, int]:
    config = DataConfig(**{**config.__dict__, "num_epochs": epochs})
    iterator = iter(make_dataset(source, config, process_index=0, process_count=1))
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["clip_index"])
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=33, help="frames per example (8k+1)")
    parser.add_argument("--source-frames", type=int, default=49, help="frames per stored video")
    parser.add_argument("--source", type=int, nargs=2, default=(144, 256), metavar=("H", "W"))
    parser.add_argument("--target", type=int, nargs=2, default=(128, 224), metavar=("H", "W"))
    parser.add_argument("--latent-frames", type=int, default=0, help="use 720p latent clips of this many poses")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    before = machine_state()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_"))
    config = DataConfig(num_frames=args.frames, target_size=tuple(args.target), batch_size=2, num_threads=args.threads)
    videos = work / "videos"
    if not (videos / clip_format.INDEX_FILE).is_file():
        start = time.perf_counter()
        synthetic.write_synthetic_dataset(videos, args.clips, args.source_frames, *args.source, seed=0)
        print(f"rendered {args.clips} clips in {time.perf_counter() - start:.1f} s")
        cache.cache_latents(videos, pooling_encoder, tuple(args.target))
    rate, count = clips_per_second(ClipDirectorySource(videos, "video"), config, args.epochs)
    sizes = f"{args.source[0]}x{args.source[1]} -> {args.target[0]}x{args.target[1]}"
    description = f"{sizes}, {args.frames} of {args.source_frames} frames"
    print(f"| decoded video | {description} | {args.threads} | {count} | {rate:.1f} |")

    if args.latent_frames:
        latents = work / f"latents_{args.latent_frames}"
        if not (latents / clip_format.INDEX_FILE).is_file():
            write_720p_latent_clips(latents, args.clips, args.latent_frames)
        config = DataConfig(**{**config.__dict__, "num_frames": args.latent_frames, "target_size": (704, 1280)})
        description = f"704x1280, {args.latent_frames} frames ({(args.latent_frames - 1) // 8 + 1}x22x40x128 fp16)"
        source = ClipDirectorySource(latents, "latents")
    else:
        description = f"{args.target[0]}x{args.target[1]}, {args.frames} frames"
        source = ClipDirectorySource(videos, "latents")
    rate, count = clips_per_second(source, config, args.epochs)
    print(f"| cached latents | {description} | {args.threads} | {count} | {rate:.1f} |")
    report_machine(before)


if __name__ == "__main__":
    main()
