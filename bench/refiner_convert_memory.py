"""Peak host memory of converting the refiner transformer shard by shard, on a synthetic checkpoint with the released
key layout (video and audio tensors, bf16, ~5 GB shards with an index, as the release folder).

The synthetic shards are sparse files: their headers are real and their data are holes that read as zeros, so
nothing of the checkpoint's size is written or held to make them. The conversion (`models.refiner.release`'s
`write_converted`, bf16 output in one orbax part per shard) runs in a child process whose peak RSS is reported
against the checkpoint and largest-shard sizes. The output is written under --workdir and deleted afterwards (the
synthetic zeros are stored compressed, so it takes little disk; real weights would take 26 GB at full size).

    python bench/refiner_convert_memory.py [--layers 48] [--shard-gb 5] [--workdir /tmp/refiner_convert]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def released_state_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of diffusers' default (released) refiner transformer with `num_layers` blocks, on the meta device."""
    import torch
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    with torch.device("meta"):
        model = SanaWMLTX2RefinerTransformer3DModel(num_layers=num_layers)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def write_sparse_shards(folder: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: float, config: dict) -> int:
    """bf16 safetensors shards of about `shard_bytes` whose data are holes, the index and config.json; returns the
    largest shard's size in bytes."""
    folder.mkdir(parents=True)
    shards, current, size = [], [], 0
    for key in sorted(shapes):
        nbytes = 2 * math.prod(shapes[key])
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map, largest = {}, 0
    for index, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            nbytes = 2 * math.prod(shapes[key])
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header).encode()
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        largest = max(largest, offset)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return largest


def convert(folder: str, out_dir: str) -> None:
    """The child: convert `folder` into `out_dir` in bf16 parts."""
    from sanawm_jax.models.refiner.checkpoint import convert_groups, open_folder
    from sanawm_jax.models.refiner.config import RefinerConfig
    from sanawm_jax.models.refiner.release import write_converted

    source, config = open_folder(folder, RefinerConfig, param_dtype="bfloat16", dtype="bfloat16")
    write_converted(Path(out_dir), convert_groups(source, config, print), config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--workdir", default="/tmp/refiner_convert")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return convert(*args.child)
    from sanawm_jax.models.refiner.checkpoint import is_audio_key

    workdir = Path(args.workdir)
    if workdir.exists():
        sys.exit(f"error: {workdir} exists; give a new --workdir")
    try:
        shapes = released_state_shapes(args.layers)
        video = sum(math.prod(shape) for key, shape in shapes.items() if not is_audio_key(key))
        largest = write_sparse_shards(workdir / "transformer", shapes, args.shard_gb * GB,
                                      {"_class_name": "SanaWMLTX2RefinerTransformer3DModel",
                                       "num_layers": args.layers})
        total = 2 * sum(math.prod(s) for s in shapes.values())
        print(f"synthetic checkpoint: {args.layers} layers, {total / GB:.1f} GB bf16 in "
              f"{len(list((workdir / 'transformer').glob('*.safetensors')))} shards (largest {largest / GB:.2f} GB); "
              f"video path {video / 1e9:.2f} B parameters = {2 * video / GB:.1f} GB bf16")
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", str(workdir / "transformer"), str(workdir / "out")],
                       check=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"converted in {time.perf_counter() - start:.0f} s; peak RSS of the conversion {peak / GB:.2f} GB "
              f"(largest shard {largest / GB:.2f} GB, video path {2 * video / GB:.1f} GB)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
