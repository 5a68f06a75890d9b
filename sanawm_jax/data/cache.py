"""Caching: clip videos -> VAE latents, captions -> text embeddings.

    python -m sanawm_jax.data.cache latents --data DIR --height 704 --width 1280 --vae VAE_DIR
    python -m sanawm_jax.data.cache latents --data DIR --height 704 --width 1280 --encoder MODULE:FACTORY
    python -m sanawm_jax.data.cache text --data DIR --out TEXT_DIR --text-encoder GEMMA_DIR
    python -m sanawm_jax.data.cache text --upstream RAW_DIR LATENT_DIR --out TEXT_DIR --encoder MODULE:FACTORY
    python -m sanawm_jax.data.cache import-text --embeddings FILE.npz --out TEXT_DIR

Encoders are plain callables, so any implementation plugs in:
  encode_fn(video (F, H, W, 3) float32 in [-1, 1], F = 8k+1) -> latents (T, H/32, W/32, C), T = k+1
  encode_text_fn(captions: list[str]) -> (embeddings (B, L, D), masks (B, L))
`--encoder MODULE:FACTORY` imports FACTORY and calls it with `--encoder-kwargs` (JSON) to get the callable.
`--vae` uses our LTX-2 VAE (`sanawm_jax.models.ltx2_vae`), `--diffusers-vae` the diffusers PyTorch VAE, `--text-encoder` our
Gemma-2 prompt encoder (`sanawm_jax.models.gemma`: chi prefix for captions; the null embedding is the empty caption
encoded the same way).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from sanawm_jax.data import format as clip_format
from sanawm_jax.data.sources import BadClipError, ClipDirectorySource, UpstreamZipSource
from sanawm_jax.data.transforms import latent_frames, resize_crop_frames
from sanawm_jax.data.video import read_video_window

logger = logging.getLogger(__name__)

EncodeFn = Callable[[np.ndarray], np.ndarray]
EncodeTextFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def cache_latents(
    root: str | Path,
    encode_fn: EncodeFn,
    target_size: tuple[int, int],
    *,
    time_stride: int = 8,
    overwrite: bool = False,
    skip_bad: bool = False,
) -> list[str]:
    """Encode each clip video of a clip directory and record the latents in its index; returns the keys encoded.

    A video of F frames is cut to its first (F - 1) // 8 * 8 + 1 frames, resized and centre-cropped to target_size
    (as the loader does), scaled to [-1, 1] and encoded. Clips that already have latents are kept unless
    `overwrite`. An unreadable video or one whose frame count differs from the index raises BadClipError, or is
    logged and skipped with `skip_bad`.
    """
    root = Path(root)
    clips = clip_format.read_index(root)
    encoded = []
    for position, clip in enumerate(clips):
        if clip.video is None or (clip.latents is not None and not overwrite):
            continue
        try:
            latents = _encode_clip(root, clip, encode_fn, tuple(target_size), time_stride)
        except BadClipError as error:
            if not skip_bad:
                raise
            logger.warning("skipped %s", error)
            continue
        clips[position] = dataclasses.replace(
            clip, latents=clip_format.write_latents(root, clip.key, latents, target_size)
        )
        clip_format.write_index(root, clips)
        encoded.append(clip.key)
    return encoded


def _encode_clip(root: Path, clip, encode_fn: EncodeFn, target_size: tuple[int, int], time_stride: int) -> np.ndarray:
    num_frames = (clip.num_frames - 1) // time_stride * time_stride + 1
    try:
        frames, total, _ = read_video_window(root / clip.video, 0, num_frames)
    except OSError as error:
        raise BadClipError(clip.key, str(error)) from error
    if total != clip.num_frames:
        raise BadClipError(clip.key, f"video has {total} frames, the index says {clip.num_frames}")
    video = resize_crop_frames(frames, target_size).astype(np.float32) / 127.5 - 1.0
    latents = np.asarray(encode_fn(video), np.float32)
    height, width = target_size
    expected_t = latent_frames(num_frames, time_stride)
    if latents.ndim != 4 or latents.shape[0] != expected_t or height % latents.shape[1] or width % latents.shape[2]:
        raise ValueError(f"encode_fn returned {latents.shape} for a {video.shape} video; need ({expected_t}, h, w, C)")
    return latents


def cache_text(
    captions: Iterable[str],
    encode_text_fn: EncodeTextFn,
    store: clip_format.TextEmbeddingStore,
    *,
    batch_size: int = 8,
) -> int:
    """Encode the distinct captions not yet in the store, and the null embedding if missing; returns how many
    captions were encoded.

    The null embedding (what text dropout trains on) is `encode_text_fn([""])`: the empty caption encoded exactly as
    a caption is, with the instruction prefix, and its mask. This is upstream's: its stage-1 trainer
    (train_video_scripts/train_sana_wm_stage1.py) encodes [""] with its caption encoder into null_embed.pth, and
    its checkpoint loader writes that into `y_embedder.y_embedding`, replacing the checkpoint's stored copy, before
    the model's caption dropout substitutes it. (Upstream's caption embedder swaps only the embedding and keeps the
    dropped caption's mask; here the dropped example takes the null mask too.) The negative prompt of sampling is
    encoded without the prefix.
    """
    pending = sorted({caption for caption in captions if caption and caption not in store})
    for first in range(0, len(pending), batch_size):
        batch = pending[first : first + batch_size]
        embeddings, masks = (np.asarray(a) for a in encode_text_fn(batch))
        if embeddings.shape[0] != len(batch) or masks.shape != embeddings.shape[:2]:
            raise ValueError(f"encode_text_fn returned {embeddings.shape} and {masks.shape} for {len(batch)} captions")
        for caption, embedding, mask in zip(batch, embeddings, masks):
            store.put(caption, embedding, mask)
    if not (store.root / clip_format.NULL_TEXT_FILE).is_file():
        embeddings, masks = encode_text_fn([""])
        store.put_null(np.asarray(embeddings)[0], np.asarray(masks)[0])
    return len(pending)


def source_captions(source) -> list[str]:
    """The captions of every clip of a source that has one (clips that cannot be read are skipped)."""
    if isinstance(source, ClipDirectorySource):
        return [clip.caption for clip in source.clips if clip.caption]
    captions = []
    for index in range(len(source)):
        try:
            caption = source[index].caption
        except BadClipError as error:
            logger.warning("skipped %s", error)
            continue
        if caption:
            captions.append(caption)
    return captions


def import_text_embeddings(path: str | Path, store: clip_format.TextEmbeddingStore) -> int:
    """Store precomputed embeddings from an .npz with `captions` (N,) str, `embeddings` (N, L, D), `masks` (N, L),
    and optionally `null_embedding` (L, D) with `null_mask` (L,); returns N."""
    with np.load(path, allow_pickle=False) as stored:
        captions, embeddings, masks = stored["captions"], stored["embeddings"], stored["masks"]
        if len(captions) != len(embeddings) or masks.shape != embeddings.shape[:2]:
            raise ValueError(f"{path}: captions {captions.shape}, embeddings {embeddings.shape}, masks {masks.shape}")
        for caption, embedding, mask in zip(captions.tolist(), embeddings, masks):
            store.put(caption, embedding, mask)
        if "null_embedding" in stored.files:
            store.put_null(stored["null_embedding"], stored["null_mask"])
    return len(captions)


def load_factory(spec: str, kwargs: dict | None = None):
    """'package.module:factory' -> factory(**kwargs)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"encoder must be given as MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)(**(kwargs or {}))


def sanawm_vae_encoder(checkpoint: str) -> EncodeFn:
    """encode_fn of our LTX-2 VAE converted from a diffusers `vae/` folder (or a pipeline root holding one)."""
    from sanawm_jax.models import ltx2_vae as vae

    config, params = vae.convert_vae(checkpoint)
    return lambda video: np.asarray(vae.encode(params, video[None], config)[0])


def diffusers_vae_encoder(checkpoint, subfolder: str | None = "vae") -> EncodeFn:
    """encode_fn of the diffusers `AutoencoderKLLTX2Video` (a folder or an instance): posterior mode, normalised by
    latents_mean / latents_std and scaling_factor as the diffusers SANA-WM pipeline does, channels-last float32."""
    import torch
    from diffusers import AutoencoderKLLTX2Video

    model = checkpoint
    if not isinstance(model, AutoencoderKLLTX2Video):
        model = AutoencoderKLLTX2Video.from_pretrained(checkpoint, subfolder=subfolder, torch_dtype=torch.float32)
    model = model.eval()
    mean = model.latents_mean.view(-1, 1, 1, 1).float()
    std = model.latents_std.view(-1, 1, 1, 1).float()
    dtype = next(model.parameters()).dtype

    def encode(video: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(video.transpose(3, 0, 1, 2)))[None].to(dtype)
        with torch.no_grad():
            latents = model.encode(pixels).latent_dist.mode()[0].float()
        latents = (latents - mean) * model.config.scaling_factor / std
        return latents.permute(1, 2, 3, 0).numpy()

    return encode


def sanawm_text_encoder(checkpoint: str) -> EncodeTextFn:
    """encode_text_fn of our Gemma-2 prompt encoder: captions with the chi prefix (the null embedding is its
    encoding of "", see `cache_text`)."""
    from sanawm_jax.models import gemma

    encoder = gemma.TextEncoder.from_pretrained(checkpoint)

    def encode(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        embeddings, masks = encoder.encode(captions)
        return np.asarray(embeddings, np.float32), np.asarray(masks)

    return encode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    latents = commands.add_parser("latents", help="encode the videos of a clip directory to latents")
    latents.add_argument("--data", required=True, help="clip directory")
    latents.add_argument("--height", type=int, required=True)
    latents.add_argument("--width", type=int, required=True)
    encoders = latents.add_mutually_exclusive_group(required=True)
    encoders.add_argument("--vae", help="diffusers VAE folder, encoded with sanawm_jax.models.ltx2_vae")
    encoders.add_argument("--diffusers-vae", help="diffusers VAE folder, encoded with the PyTorch diffusers VAE")
    encoders.add_argument("--encoder", help="MODULE:FACTORY returning encode_fn")
    latents.add_argument("--encoder-kwargs", default="{}", help="JSON keyword arguments of the factory")
    latents.add_argument("--overwrite", action="store_true", help="re-encode clips that already have latents")
    latents.add_argument("--skip-bad", action="store_true", help="log and skip unreadable videos instead of failing")

    text_parser = commands.add_parser("text", help="encode the captions of a dataset to text embeddings")
    datasets = text_parser.add_mutually_exclusive_group(required=True)
    datasets.add_argument("--data", help="clip directory")
    datasets.add_argument("--upstream", nargs=2, metavar=("RAW_DIR", "LATENT_DIR"), help="upstream zip layout")
    text_parser.add_argument("--out", required=True, help="text-embedding directory")
    text_encoders = text_parser.add_mutually_exclusive_group(required=True)
    text_encoders.add_argument("--text-encoder", help="Gemma-2 folder, encoded with sanawm_jax.models.gemma")
    text_encoders.add_argument("--encoder", help="MODULE:FACTORY returning encode_text_fn")
    text_parser.add_argument("--encoder-kwargs", default="{}", help="JSON keyword arguments of the factory")
    text_parser.add_argument("--batch-size", type=int, default=8)

    imported = commands.add_parser("import-text", help="store precomputed text embeddings")
    imported.add_argument("--embeddings", required=True, help=".npz with captions, embeddings, masks")
    imported.add_argument("--out", required=True, help="text-embedding directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.command == "latents":
        if args.vae:
            encode_fn = sanawm_vae_encoder(args.vae)
        elif args.diffusers_vae:
            encode_fn = diffusers_vae_encoder(args.diffusers_vae)
        else:
            encode_fn = load_factory(args.encoder, json.loads(args.encoder_kwargs))
        keys = cache_latents(
            args.data, encode_fn, (args.height, args.width), overwrite=args.overwrite, skip_bad=args.skip_bad
        )
        print(f"encoded {len(keys)} clips in {args.data}")
    elif args.command == "text":
        source = ClipDirectorySource(args.data) if args.data else UpstreamZipSource(*args.upstream)
        if args.text_encoder:
            encode_text_fn = sanawm_text_encoder(args.text_encoder)
        else:
            encode_text_fn = load_factory(args.encoder, json.loads(args.encoder_kwargs))
        store = clip_format.TextEmbeddingStore(args.out)
        count = cache_text(source_captions(source), encode_text_fn, store, batch_size=args.batch_size)
        print(f"encoded {count} captions into {args.out}")
    else:
        count = import_text_embeddings(args.embeddings, clip_format.TextEmbeddingStore(args.out))
        print(f"stored {count} caption embeddings in {args.out}")


if __name__ == "__main__":
    main()
