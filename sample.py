"""Generate a video from an image, a prompt and a camera path with SANA-WM (stage 1, and with --refine the LTX-2
refiner of stage 2) in JAX.

    python sample.py --out demo.mp4                          # embedded tiny models, bundled image, no downloads
    python sample.py --refine --out demo.mp4                 # also demo.refined.mp4 from the embedded tiny refiner
    python sample.py --mode streaming --out demo.mp4         # block-by-block streaming demo (tiny, random weights)
    python sample.py --checkpoint ckpt --image first.png --prompt "..." --action w-40,aw-24,d-16 \
        --intrinsics 640,640,640,352 --num-frames 81 --out video.mp4

Writes the mp4 (16 fps, H.264), `<stem>.latents.npz` and `<stem>.trajectory.npz` next to it. --checkpoint is a
directory written by convert_torch_weights.py (transformer/, vae/, text_encoder/). Intrinsics are [fx, fy, cx, cy] in
pixels of the input image, given inline or as a .npy of shape (3,3), (F,3,3), (4,) or (F,4).
--refine refines the stage-1 latents (checkpoint: its refiner/ from convert_torch_weights.py --refiner) and writes
`<stem>.refined.mp4` (+ its .latents.npz / .trajectory.npz), one frame shorter: the refiner drops its sink frame.
With --mode streaming each stage-1 block is refined by the chunk-causal refiner as it is produced (same result as
refining the whole clip afterwards) and, with a causal VAE decoder, decoded and appended to `<stem>.refined.mp4` at
once; each refined block's latency is printed.

--mode picks the DiT mode (default: the checkpoint's): bidirectional (all frames jointly), chunk_causal (the
chunk-wise schedule of the teacher) or streaming (the few-step student block by block, 24k+1 frames; each block is
decoded as it is done and appended to the mp4 when the VAE decoder is causal; prints each block's latency and the
real-time factor).

--mesh lays the DiT out on the devices (see sanawm_jax.parallel). Over several processes (--coordinator,
--num-processes, --process-id, the same flags on every process) each process samples on its devices and process 0
alone writes the files.

Bad input stops the run with one line `error: ...` and exit code 2 before any model loads (--debug shows the
traceback). Compiled programs are kept in JAX's persistent compilation cache, so a second run skips compilation.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import jax
import numpy as np

from sanawm_jax import camera, cli, demo
from sanawm_jax.data.video import VideoWriter
from sanawm_jax.diffusion.scheduler import SamplerConfig
from sanawm_jax.diffusion.streaming import StreamingSamplerConfig
from sanawm_jax.generate import (
    BlockReport,
    Refiner,
    StreamingRefinement,
    WorldModel,
    camera_path,
    check_checkpoint,
    check_num_frames,
    load_image,
    overlay_states,
    refine,
    report_stage,
    write_outputs,
)
from sanawm_jax.models.gemma.encoder import load_embeddings_npz
from sanawm_jax.models.refiner.sampler import SINK_SIZE
from sanawm_jax.models.sana_wm.config import ATTENTION_IMPLS, GDN_IMPLS, MODES
from sanawm_jax.ops.context_parallel import CONTEXT_IMPLS
from sanawm_jax.overlay import draw_action_overlay
from sanawm_jax.parallel import param_shardings
from sanawm_jax.pipeline import checkpoint_mode

# The demo's camera path (without --action or --c2w) is `demo.default_action(num_frames)`, its prompt the caption of
# the bundled courtyard. Per mode: the causal modes get enough frames for two chunks (49 pixel frames = 7 latent
# frames = 4 + 3).
DEMO_DEFAULTS = {"steps": 4}
DEMO_NUM_FRAMES = {"bidirectional": 17, "chunk_causal": 49, "streaming": 49}
STREAM_FPS = 16  # pixel frames per second of generated video, for the real-time factor
# The refiner's first block compiles its programs; later full blocks reuse them (a shorter last block compiles anew).
REFINER_COMPILING = 1


def parse_intrinsics(value: str) -> np.ndarray:
    """--intrinsics: four numbers fx,fy,cx,cy -> (4,) float32, or a .npy file's array."""
    if value.endswith(".npy"):
        if not Path(value).is_file():
            raise cli.UsageError(f"--intrinsics file {value} does not exist")
        return np.load(value)
    try:
        numbers = np.array([float(x) for x in value.split(",")], np.float32)
    except ValueError:
        numbers = None
    if numbers is None or numbers.shape != (4,):
        raise cli.UsageError(f"--intrinsics takes fx,fy,cx,cy (four numbers) or a .npy file, got {value!r}")
    return numbers


def parse_denoising_steps(value: str) -> StreamingSamplerConfig:
    try:
        return StreamingSamplerConfig(denoising_steps=tuple(int(x) for x in value.split(",")))
    except ValueError as error:
        raise cli.UsageError(f"--denoising-steps {value!r}: {error}") from None


def check_stream_num_frames(num_frames: int) -> None:
    """Streaming blocks are 3 latent frames (24 pixel frames) after a first of 25: 24k+1 frames, k >= 2."""
    if num_frames >= 49 and (num_frames - 1) % 24 == 0:
        return
    below = max(49, num_frames - (num_frames - 1) % 24)
    raise cli.UsageError(f"--num-frames {num_frames}: streaming generates 24k+1 frames (k >= 2); use {below} or "
                         f"{below + 24}")


def print_block_report(reports: list, what: str = "block", compiling: int = 2):
    """An `on_block` callback printing each block's latency and real-time factor (seconds of video at 16 fps per
    wall-clock second) and keeping the reports; the first `compiling` blocks are noted as compiling."""

    def on_block(report: BlockReport):
        reports.append(report)
        note = " (includes compilation)" if report.index < compiling else ""
        print(f"{what} {report.index}: latent frames {report.start}-{report.end - 1}, {report.pixel_frames} frames "
              f"in {report.seconds * 1000:.0f} ms, real-time factor {report.pixel_frames / STREAM_FPS / report.seconds:.2f}"
              f"{note}")

    return on_block


def print_totals(reports: list, what: str, compiling: int = 2) -> None:
    """The real-time factor over all blocks' reports, and over those after the first `compiling` ones."""
    frames, seconds = sum(r.pixel_frames for r in reports), sum(r.seconds for r in reports)
    print(f"{what} {frames} frames ({frames / STREAM_FPS:.2f} s of video) in {seconds:.2f} s: real-time factor "
          f"{frames / STREAM_FPS / seconds:.2f}")
    steady = reports[compiling:]
    if steady:
        frames, seconds = sum(r.pixel_frames for r in steady), sum(r.seconds for r in steady)
        print(f"after compilation (blocks {compiling}-{reports[-1].index}): real-time factor "
              f"{frames / STREAM_FPS / seconds:.2f}")


def frame_writer(writer: VideoWriter, states):
    """An `on_frames` callback appending frames to `writer`, with the action overlay of `states` (key levels, look)
    at the frames' positions in the video unless `states` is None."""

    def on_frames(frames):
        if states is not None:
            done = writer.num_frames
            frames = draw_action_overlay(frames, states[0][done : done + len(frames)],
                                         states[1][done : done + len(frames)])
        writer.append(frames)

    return on_frames


def refined_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".refined" + out.suffix)


def generate_streaming(world, image, c2w, intrinsics, text, sampler, args, write_mp4: bool, refiner_stream=None):
    """`WorldModel.generate_streaming`, printing each block's latency and real-time factor and the totals; with
    `write_mp4` (a causal VAE decoder) each decoded block is appended to the mp4 `args.out` at once (progressive:
    playable while it is written; with the action overlay unless --no-action-overlay). With a `refiner_stream`
    (`Refiner.start_stream`) each block's latents are refined as they are produced (between stage-1 blocks, outside
    their times; each refinement's latency printed) and, with `write_mp4`, decoded and appended to
    `<stem>.refined.mp4` at once. Returns (stage-1 result, refined result or None)."""
    reports, refined_reports = [], []
    report_block = print_block_report(reports)
    states = refined_states = None
    if not args.no_action_overlay:
        convention, speeds = args.action_convention, (args.translation_speed, args.rotation_speed_deg)
        states = overlay_states(c2w, args.action, convention, *speeds)
        # as `write_outputs` draws it on the refined result: read back from its camera path (one frame shorter)
        refined_states = overlay_states(c2w[SINK_SIZE:], None, convention, *speeds)
    if write_mp4:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as files:
        on_frames = refinement = None
        if write_mp4:
            writer = files.enter_context(VideoWriter(args.out, fps=STREAM_FPS, crf=18, progressive=True))
            on_frames = frame_writer(writer, states)
        if refiner_stream is not None:
            on_refined_frames = None
            if write_mp4:
                refined_writer = files.enter_context(VideoWriter(refined_path(args.out), fps=STREAM_FPS, crf=18,
                                                                 progressive=True))
                on_refined_frames = frame_writer(refined_writer, refined_states)
            refinement = StreamingRefinement(world, refiner_stream, on_frames=on_refined_frames,
                                             on_block=print_block_report(refined_reports, "refined block",
                                                                         REFINER_COMPILING))

        def on_block(report: BlockReport):
            report_block(report)
            if refinement is not None:
                refinement.push(report.latents)

        result = world.generate_streaming(image, c2w, intrinsics, text, sampler, seed=args.seed,
                                          on_block=on_block, on_frames=on_frames)
        refined = None if refinement is None else refinement.finish(result)
    print_totals(reports, "streamed")
    if refined_reports:
        print_totals(refined_reports, "refined", REFINER_COMPILING)
    return result, refined


def load_refiner(args, world) -> Refiner:
    if args.checkpoint is None:
        report_stage(f"building the tiny demo refiner (random weights from seed {args.seed})")
        return demo.demo_refiner(args.seed, world.vae_config.latent_channels)
    report_stage(f"loading {args.checkpoint}/refiner")
    return Refiner.from_checkpoint(args.checkpoint, args.dtype)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="converted checkpoint directory (default: embedded tiny demo models)")
    parser.add_argument("--image", help="first frame (default with the demo: the bundled example image)")
    parser.add_argument("--prompt", help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (encoded without the instruction prefix)")
    parser.add_argument("--embeddings", help=".npz of precomputed prompt embeddings (instead of the text encoder)")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--action", help="action string '<keys>-<frames>,...', e.g. w-40,aw-24,none-8: w/s forward/"
                                       "back, a/d turn, i/k look up/down, j/l strafe (eased, as the released CLI)")
    path.add_argument("--c2w", help=".npy of camera-to-world poses (F, 4, 4), OpenCV axes")
    parser.add_argument("--action-convention", default="sana_wm", choices=list(camera.ACTION_CONVENTIONS),
                        help="key mapping of --action: sana_wm (released CLI) or diffusers (a/d strafe, j/l turn)")
    parser.add_argument("--translation-speed", type=float,
                        help="--action distance per frame; with --c2w, the speed that lights an overlay key fully "
                             "(default: 0.025 sana_wm, 0.05 diffusers)")
    parser.add_argument("--rotation-speed-deg", type=float,
                        help="--action degrees per frame (default: 0.6 sana_wm, 1.2 diffusers)")
    parser.add_argument("--no-action-overlay", action="store_true",
                        help="leave the WASD + joystick overlay off the mp4 (the .npz outputs never have it)")
    parser.add_argument("--intrinsics", help="fx,fy,cx,cy in input-image pixels, or a .npy")
    parser.add_argument("--num-frames", type=int, help="pixel frames, 8k+1 (default: 961 = 60 s; demo: 17)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 60; demo: 4)")
    parser.add_argument("--cfg", type=float, default=5.0, help="text guidance scale (<= 1 disables CFG)")
    parser.add_argument("--shift", type=float, default=9.8, help="flow-matching shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="compute dtype with --checkpoint (the demo runs in float32)")
    parser.add_argument("--fused", action="store_true", help="run all denoising steps as one XLA program")
    parser.add_argument("--gdn-impl", choices=GDN_IMPLS,
                        help="GDN recurrence: xla (default, any device) or pallas (fused GPU kernel)")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="softmax attention: xla (default, any device) or cudnn (fused kernel on NVIDIA GPUs)")
    parser.add_argument("--context-impl", choices=CONTEXT_IMPLS,
                        help="frame-mixing layers on a --mesh with context > 1: allgather (default), ring or ulysses")
    parser.add_argument("--mode", choices=MODES,
                        help="DiT mode: bidirectional, chunk_causal (chunk-wise sampler) or streaming (few-step "
                             "block-by-block sampler); default: the checkpoint's (the demo: bidirectional)")
    parser.add_argument("--denoising-steps", default="1000,960,889,727,0",
                        help="streaming: the student's timesteps, decreasing to 0 (the released default)")
    parser.add_argument("--refine", action="store_true",
                        help="run stage 2 (the LTX-2 refiner) too; writes <stem>.refined.mp4 beside --out")
    cli.add_parallel_flags(parser)
    cli.add_compilation_cache_flags(parser)
    parser.add_argument("--out", required=True, help="output .mp4")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Every input is checked before any model is loaded or any file written; the checkpoint comes first.
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint, with_text_encoder=args.embeddings is None)
        if args.refine and not (Path(args.checkpoint) / "refiner" / "transformer" / "config.json").is_file():
            raise cli.UsageError(f"--refine needs {args.checkpoint}/refiner/ (convert_torch_weights.py --refiner)")
        if args.refine and args.prompt is None:
            raise cli.UsageError("--refine needs --prompt (the refiner encodes it with Gemma-3)")
    saved_mode = None if args.checkpoint is None else checkpoint_mode(args.checkpoint)
    if args.mode is not None and saved_mode is not None and args.mode != saved_mode:
        raise cli.UsageError(f"{args.checkpoint} holds a {saved_mode} DiT; it cannot run with --mode {args.mode}")
    args.mode = args.mode or saved_mode or "bidirectional"
    streaming_sampler = parse_denoising_steps(args.denoising_steps)
    if args.num_frames is not None:
        check_num_frames(args.num_frames, "--num-frames")
        if args.mode == "streaming":
            check_stream_num_frames(args.num_frames)
    if args.checkpoint is None:
        target_size = demo.TARGET_SIZE
        image_path = args.image or demo.asset_path(demo.EXAMPLE_IMAGE)
        intrinsics = parse_intrinsics(args.intrinsics) if args.intrinsics else demo.example_intrinsics()
        demo_defaults = {**DEMO_DEFAULTS, "num_frames": DEMO_NUM_FRAMES[args.mode],
                         "prompt": demo.example_description()["caption"]}
        for name, value in demo_defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if args.action is None and args.c2w is None:
            args.action = demo.default_action(args.num_frames)
    else:
        for name in ("image", "intrinsics"):
            if getattr(args, name) is None:
                raise cli.UsageError(f"--{name} is required with --checkpoint")
        if args.prompt is None and args.embeddings is None:
            raise cli.UsageError("--prompt or --embeddings is required with --checkpoint")
        if args.action is None and args.c2w is None:
            raise cli.UsageError("give a camera path: --action or --c2w")
        target_size = camera.TARGET_SIZE
        image_path, intrinsics = args.image, parse_intrinsics(args.intrinsics)
    image, source_size = load_image(image_path, target_size)
    c2w = None if args.c2w is None else np.load(args.c2w)
    c2w, intrinsics = camera_path(args.num_frames or 961, source_size, target_size, intrinsics=intrinsics,
                                  action=args.action, c2w=c2w, action_convention=args.action_convention,
                                  translation_speed=args.translation_speed,
                                  rotation_speed_deg=args.rotation_speed_deg)
    # Guidance is distilled into the streaming student (one model call per step).
    sampler = SamplerConfig(num_steps=args.steps or 60, guidance_scale=1.0 if args.mode == "streaming" else args.cfg,
                            shift=args.shift)
    text = None
    if args.embeddings:
        text = load_embeddings_npz(args.embeddings, caption_channels=None, max_sequence_length=None)
        if sampler.uses_guidance and text.negative_prompt_embeds is None:
            raise cli.UsageError(f"--cfg {args.cfg} needs negative embeddings in {args.embeddings} (or --cfg 1)")
    report_stage(f"camera path: {len(c2w)} frames "
                 + (f"along {args.action!r} ({args.action_convention} keys)" if args.action else f"from {args.c2w}"))

    mesh = cli.apply_parallel_flags(args)  # joins the other processes; the device count fits the mesh
    primary = jax.process_index() == 0  # over several processes, every one samples and process 0 writes the files
    cache_dir = cli.apply_compilation_cache_flags(args)
    overrides = {name: getattr(args, name) for name in ("gdn_impl", "attention_impl", "context_impl", "mode") if getattr(args, name)}
    if args.checkpoint is None:
        if demo.has_trained_weights(**overrides):
            weights = "trained DiT and VAE, random text encoder"
        else:
            weights = (f"random weights from seed {args.seed}: this mode has no trained tiny weights, so the video "
                       f"has structure but no meaning")
        report_stage(f"building the tiny demo models, {args.mode} DiT ({weights})"
                     + (f"; compilation cache {cache_dir}" if cache_dir else ""))
        world = demo.demo_world_model(args.seed, **overrides)
    else:
        report_stage(f"loading {args.checkpoint}" + (f"; compilation cache {cache_dir}" if cache_dir else ""))
        world = WorldModel.from_checkpoint(args.checkpoint, args.dtype, target_size,
                                           with_text_encoder=args.embeddings is None, **overrides)
    if text is None:
        report_stage("encoding the prompt")
        text = world.encode_prompt(args.prompt, args.negative_prompt, cfg=sampler.uses_guidance)
    elif text.prompt_embeds.shape[-1] != world.model.config.caption_channels:
        raise ValueError(f"{args.embeddings}: prompt_embeds has {text.prompt_embeds.shape[-1]} channels, the model "
                         f"takes {world.model.config.caption_channels}")
    if mesh.size > 1:  # the DiT's parameters laid out on the mesh; its programs trace under it
        world.params = jax.device_put(world.params, param_shardings(world.params, mesh))
        jax.set_mesh(mesh)
    streamed_mp4 = args.mode == "streaming" and world.vae_config.decoder_causal and primary
    refiner = load_refiner(args, world) if args.refine else None
    if args.mode == "streaming":
        stream = None
        if refiner is not None:
            report_stage("encoding the prompt for the refiner; each block is refined as it is produced")
            stream = refiner.start_stream(args.prompt, seed=args.seed)
        if streamed_mp4:
            report_stage(f"writing {args.out}" + (" and its refinement" if stream else "")
                         + " as the blocks are decoded (playable while it grows)")
        result, refined = generate_streaming(world, image, c2w, intrinsics, text, streaming_sampler, args,
                                             streamed_mp4, stream)
    else:
        result = world.generate(image, c2w, intrinsics, text, sampler, seed=args.seed, fused=args.fused)
    if primary:
        report_stage(f"writing {args.out}" if not streamed_mp4 else "writing the latents and trajectory")
        for kind, path in write_outputs(args.out, result, action=args.action, action_convention=args.action_convention,
                                        translation_speed=args.translation_speed,
                                        rotation_speed_deg=args.rotation_speed_deg,
                                        action_overlay=not args.no_action_overlay, write_mp4=not streamed_mp4).items():
            print(f"{kind}: {path}")
        if streamed_mp4:
            print(f"video: {args.out}")
    if refiner is not None:
        refined_out = refined_path(args.out)
        if args.mode != "streaming":
            refined = refine(world, refiner, result, args.prompt, seed=args.seed)
        if not primary:
            return
        report_stage(f"writing {refined_out}" if not streamed_mp4 else "writing the refined latents and trajectory")
        for kind, path in write_outputs(refined_out, refined, action_convention=args.action_convention,
                                        translation_speed=args.translation_speed,
                                        rotation_speed_deg=args.rotation_speed_deg,
                                        action_overlay=not args.no_action_overlay,
                                        write_mp4=not streamed_mp4).items():
            print(f"refined {kind}: {path}")
        if streamed_mp4:
            print(f"refined video: {refined_out}")

if __name__ == "__main__":
    cli.run(main)
