"""Stage-1 training of the SANA-WM DiT on cached latents and text embeddings.

    python train.py --workdir runs/demo --steps 40                       # embedded default: tiny models, CPU
    python train.py --workdir runs/wm --config 2.6b --data CLIPS --text TEXT --num-frames 961 --height 704 \
        --width 1280 --mesh fsdp=8 --dtype bfloat16 --remat
    python train.py --workdir runs/s1 --recipe configs/train/sana_wm_stage1_chunk_causal_720p.json --data CLIPS
    python train.py --workdir runs/demo --mesh data=2,fsdp=4 --batch-size 2 \
        --coordinator host0:1234 --num-processes 2 --process-id I            # on each of 2 processes, I = 0, 1

Without --data, a few synthetic clips are rendered into WORKDIR/data, their latents cached with the tiny demo VAE
and their captions with the tiny demo text encoder (random weights), and the tiny DiT is trained on them. --data is a
clip directory with cached latents (`python -m sanawm_jax.data.cache latents`), --text its text-embedding store
(default DATA/text). A workdir that holds checkpoints is resumed from the newest intact one unless --no-resume.

--recipe FILE reads flag values from a JSON object (keys are flag names with underscores, e.g. "batch_size"); flags
on the command line override it, and the resolved values are written to WORKDIR/recipe.json. --mesh lays the devices
out (see sanawm_jax.parallel). Over several processes (--coordinator, --num-processes, --process-id, same workdir on a
shared file system) each process loads batch_size / N examples of every step and orbax checkpoints collectively.

One run at a time holds a workdir (WORKDIR/train.lock). The run appends WORKDIR/metrics.jsonl (step, loss, grad_norm,
learning_rate, step_time_s, tokens_per_s every --log-every steps) and TensorBoard event files in WORKDIR/tensorboard
(`tensorboard --logdir WORKDIR/tensorboard`). Bad flags or inputs exit with code 2 and one line; --debug shows the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import jax

from sanawm_jax import cli
from sanawm_jax.data import (
    ClipDirectorySource,
    DataConfig,
    TextEmbeddingStore,
    make_dataset,
)
from sanawm_jax.demo import DEMO_DATA, build_demo_dataset
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.models.sana_wm.config import MODES, get_config
from sanawm_jax.parallel import format_mesh
from sanawm_jax.parallel.distributed import barrier
from sanawm_jax.training import TrainConfig, Trainer
from sanawm_jax.training.loop import local_batch_size
from sanawm_jax.training.lock import WorkdirLock
from sanawm_jax.training.objective import TIMESTEP_SAMPLING

RECIPE_FILE = "recipe.json"  # the resolved recipe of the run, written into the workdir
CONFIG_ALIASES = {"tiny": "sana_wm_tiny", "2.6b": "sana_wm_2.6b"}


def flag_type(convert, ok, requirement: str):
    """An argparse `type`: `convert` the text and reject values for which `ok` is false, so that the error names the
    flag ("argument --lr: must be a positive finite number, got 'nan'")."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


POSITIVE_INT = flag_type(int, lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = flag_type(int, lambda v: v >= 0, "an integer >= 0")
FRAME_COUNT = flag_type(int, lambda v: v >= 1 and (v - 1) % 8 == 0, "8k+1 (9, 17, 25, ...)")
POSITIVE_FLOAT = flag_type(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
PROBABILITY = flag_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True, help="checkpoints, configs, metrics and (by default) the demo data")
    parser.add_argument("--config", default="tiny", help="tiny | 2.6b | a SanaWMConfig or diffusers config.json")
    parser.add_argument("--data", help="clip directory with cached latents (default: the embedded synthetic set)")
    parser.add_argument("--text", help="text-embedding store (default: DATA/text)")
    parser.add_argument("--steps", type=NON_NEGATIVE_INT, default=40, help="train until this step")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1)
    parser.add_argument("--num-frames", type=FRAME_COUNT, help="pixel frames per clip, 8k+1 (default: 961; demo: 17)")
    parser.add_argument("--height", type=POSITIVE_INT, help="frame height the latents encode (default: 704; demo: 64)")
    parser.add_argument("--width", type=POSITIVE_INT, help="frame width the latents encode (default: 1280; demo: 96)")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=TrainConfig.learning_rate)
    parser.add_argument("--text-dropout", type=PROBABILITY, default=TrainConfig.text_dropout)
    parser.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLING, default=TrainConfig.timestep_sampling,
                        help="per-frame logit-normal σ, or upstream's stage-1 chunk-timestep mixture")
    parser.add_argument("--checkpoint-every", type=POSITIVE_INT, default=TrainConfig.checkpoint_every)
    parser.add_argument("--log-every", type=POSITIVE_INT, default=TrainConfig.log_every,
                        help="steps per record of WORKDIR/metrics.jsonl and TensorBoard")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--remat", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--mode", choices=MODES[:2], help="DiT attention mode (default: the config's); upstream's "
                                                          "stage-1 teacher trains chunk_causal")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    cli.add_parallel_flags(parser)
    cli.add_compilation_cache_flags(parser)
    parser.add_argument("--recipe", help="a training recipe (JSON of flag values, e.g. configs/train/tiny_demo.json); "
                                         "flags given on the command line override its fields")
    return parse_with_recipe(parser, list(sys.argv[1:] if argv is None else argv))


# Flags a recipe may not set: where this run writes, how its processes meet, and how the command itself behaves.
NOT_IN_RECIPE = ("workdir", "recipe", "debug", "coordinator", "num_processes", "process_id", "no_resume",
                 "compilation_cache", "no_compilation_cache")


def parse_with_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; with --recipe FILE, its fields (flag names with underscores -> values) are parsed first, as
    flags placed before the command line's, so that the command line overrides them. The namespace gets
    `resolved_recipe`: every recipe-able flag's final value."""
    args = parser.parse_args(argv)
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    if args.recipe is not None:
        path = Path(args.recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            recipe = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"recipe {path} is not valid JSON: {error}") from None
        if not isinstance(recipe, dict):
            raise ValueError(f"recipe {path} must hold a JSON object of flag values")
        unknown = sorted(name for name in recipe if name not in actions or name in NOT_IN_RECIPE)
        if unknown:
            raise ValueError(f"recipe {path}: unknown or not settable field {unknown[0]!r}")
        prefix = []
        for name, value in recipe.items():
            flag = actions[name].option_strings[-1]
            if isinstance(actions[name], argparse._StoreTrueAction):
                if value not in (True, False):
                    raise ValueError(f"recipe {path}: {name} must be true or false, got {value!r}")
                prefix += [flag] if value else []
            elif value is not None:
                prefix += [flag, str(value)]
        args = parser.parse_args(prefix + argv)
    args.resolved_recipe = {name: getattr(args, name) for name in actions if name not in NOT_IN_RECIPE + ("help",)}
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("sanawm_jax").setLevel(logging.INFO)
    workdir = Path(args.workdir)
    if args.data is not None:  # checked before the workdir is touched
        source = ClipDirectorySource(args.data, inputs="latents")
        text_dir = Path(args.text or Path(args.data) / "text")
        if not text_dir.is_dir():
            raise FileNotFoundError(f"text-embedding store {text_dir} does not exist (give --text)")
    mesh = cli.apply_parallel_flags(args)  # joins the other processes; the device count fits the mesh
    model_config = get_config(CONFIG_ALIASES.get(args.config, args.config), dtype=args.dtype, remat=args.remat,
                              **({"mode": args.mode} if args.mode else {}))
    if args.config == "tiny":
        model_config = model_config.replace(in_channels=vae.VAE_PRESETS["ltx2_video_tiny"].latent_channels)
    if args.data is None:
        default_frames, default_size = DEMO_DATA["num_frames"], (DEMO_DATA["height"], DEMO_DATA["width"])
    else:
        default_frames, default_size = TrainConfig.num_frames, TrainConfig.target_size
    config = TrainConfig(
        learning_rate=args.lr, text_dropout=args.text_dropout, num_frames=args.num_frames or default_frames,
        target_size=(args.height or default_size[0], args.width or default_size[1]), batch_size=args.batch_size,
        num_steps=args.steps, checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
        mesh=format_mesh(dict(mesh.shape)), timestep_sampling=args.timestep_sampling,
    )
    cli.apply_compilation_cache_flags(args)
    primary = jax.process_index() == 0
    with WorkdirLock(workdir) if primary else contextlib.nullcontext():  # process 0 holds it for the run
        args.resolved_recipe["mesh"] = config.mesh
        if primary:
            (workdir / RECIPE_FILE).write_text(json.dumps(args.resolved_recipe, indent=2) + "\n")
        if args.data is None:
            if primary:
                build_demo_dataset(workdir / "data")
            barrier("demo data built")
            data_dir, text_dir = build_demo_dataset(workdir / "data")  # complete now: only returns the paths
            source = ClipDirectorySource(data_dir, inputs="latents")
        data_config = DataConfig(
            num_frames=config.num_frames, target_size=config.target_size, batch_size=local_batch_size(config),
            caption_dropout=config.text_dropout, seed=config.seed,
        )
        dataset = make_dataset(source, data_config, TextEmbeddingStore(text_dir))
        trainer = Trainer(model_config, config, workdir, dataset, resume=not args.no_resume)
        try:
            return trainer.run()
        finally:
            trainer.close()


if __name__ == "__main__":
    cli.run(main)
