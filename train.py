"""Stage-1 training of the SANA-WM DiT on cached latents and text embeddings.

    python train.py --workdir runs/demo --steps 40                       # embedded default: tiny models, CPU
    python train.py --workdir runs/wm --config 2.6b --data CLIPS --text TEXT --num-frames 961 --height 704 \
        --width 1280 --mesh-fsdp 8 --dtype bfloat16 --remat

Without --data, a few synthetic clips are rendered into WORKDIR/data, their latents cached with the tiny demo VAE
and their captions with the tiny demo text encoder (random weights), and the tiny DiT is trained on them. --data is a
clip directory with cached latents (`python -m sanawm_jax.data.cache latents`), --text its text-embedding store
(default DATA/text). A workdir that holds checkpoints is resumed from the latest one unless --no-resume.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sanawm_jax.data import (
    ClipDirectorySource,
    DataConfig,
    TextEmbeddingStore,
    make_dataset,
)
from sanawm_jax.demo import DEMO_DATA, build_demo_dataset
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.models.sana_wm.config import get_config
from sanawm_jax.training import TrainConfig, Trainer

CONFIG_ALIASES = {"tiny": "sana_wm_tiny", "2.6b": "sana_wm_2.6b"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="checkpoints, configs and (by default) the demo data")
    parser.add_argument("--config", default="tiny", help="tiny | 2.6b | a SanaWMConfig or diffusers config.json")
    parser.add_argument("--data", help="clip directory with cached latents (default: the embedded synthetic set)")
    parser.add_argument("--text", help="text-embedding store (default: DATA/text)")
    parser.add_argument("--steps", type=int, default=40, help="train until this step")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-frames", type=int, help="pixel frames per clip, 8k+1 (default: 961; demo: 17)")
    parser.add_argument("--height", type=int, help="frame height the latents encode (default: 704; demo: 64)")
    parser.add_argument("--width", type=int, help="frame width the latents encode (default: 1280; demo: 96)")
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--text-dropout", type=float, default=TrainConfig.text_dropout)
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--mesh-data", type=int, default=-1, help="data-parallel size (-1: all remaining devices)")
    parser.add_argument("--mesh-fsdp", type=int, default=1, help="FSDP size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--remat", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("sanawm_jax").setLevel(logging.INFO)
    workdir = Path(args.workdir)
    if args.data is None:
        data_dir, text_dir = build_demo_dataset(workdir / "data")
    else:
        data_dir, text_dir = Path(args.data), Path(args.text or Path(args.data) / "text")
    model_config = get_config(CONFIG_ALIASES.get(args.config, args.config), dtype=args.dtype, remat=args.remat)
    if args.config == "tiny":
        model_config = model_config.replace(in_channels=vae.VAE_PRESETS["ltx2_video_tiny"].latent_channels)
    if args.data is None:
        default_frames, default_size = DEMO_DATA["num_frames"], (DEMO_DATA["height"], DEMO_DATA["width"])
    else:
        default_frames, default_size = TrainConfig.num_frames, TrainConfig.target_size
    num_frames = args.num_frames or default_frames
    target_size = (args.height or default_size[0], args.width or default_size[1])
    config = TrainConfig(
        learning_rate=args.lr, text_dropout=args.text_dropout, num_frames=num_frames, target_size=target_size,
        batch_size=args.batch_size, num_steps=args.steps, checkpoint_every=args.checkpoint_every, seed=args.seed,
        mesh_data=args.mesh_data, mesh_fsdp=args.mesh_fsdp,
    )
    data_config = DataConfig(
        num_frames=config.num_frames, target_size=config.target_size, batch_size=config.batch_size,
        caption_dropout=config.text_dropout, seed=config.seed,
    )
    dataset = make_dataset(ClipDirectorySource(data_dir, inputs="latents"), data_config, TextEmbeddingStore(text_dir))
    trainer = Trainer(model_config, config, workdir, dataset, resume=not args.no_resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
