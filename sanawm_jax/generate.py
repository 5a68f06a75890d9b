"""Generation: image + prompt + camera path -> video (stage 1), and its refinement (stage 2), every model in JAX.

    world = WorldModel.from_checkpoint("ckpt")                 # written by convert_torch_weights.py
    image, source_size = load_image("first_frame.png", world.target_size)
    c2w, intrinsics = camera_path(17, source_size, world.target_size, action="w-16", intrinsics=[fx, fy, cx, cy])
    result = world.generate(image, c2w, intrinsics, world.encode_prompt("a quiet street", cfg=True))
    write_outputs("video.mp4", result)
    refined = refine(world, Refiner.from_checkpoint("ckpt"), result, "a quiet street")   # ckpt/refiner/
    write_outputs("video.refined.mp4", refined)

A streaming model refines each block as it is produced:

    stage2 = StreamingRefinement(world, refiner.start_stream("a quiet street"), on_frames=writer.append)
    result = world.generate_streaming(image, c2w, intrinsics, text, on_block=lambda block: stage2.push(block.latents))
    refined = stage2.finish(result)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from sanawm_jax import camera, overlay, pipeline
from sanawm_jax.checkpoint import store
from sanawm_jax.data.video import DEFAULT_FPS, write_video
from sanawm_jax.diffusion.chunked import sample_chunk_causal
from sanawm_jax.diffusion.sampler import initial_noise, sample
from sanawm_jax.diffusion.scheduler import SamplerConfig
from sanawm_jax.diffusion.streaming import StreamingSamplerConfig, stream_sample
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.models.gemma.encoder import PromptEmbeddings, TextEncoder
from sanawm_jax.models.refiner.prompt import RefinerTextEncoder
from sanawm_jax.models.refiner.release import load_refiner_components
from sanawm_jax.models.refiner.sampler import SINK_SIZE, RefinerStream, frame_noise, refine_latents
from sanawm_jax.models.refiner.transformer import RefinerTransformer
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer


def load_image(path, target_size: tuple[int, int] = camera.TARGET_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image resized to cover `target_size` (H, W) with Lanczos, centre-cropped, scaled to [-1, 1].

    Returns (image (H, W, 3) float32, source size (h, w)).
    """
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    source_size = (picture.height, picture.width)
    (resized_h, resized_w), (top, left) = camera.center_crop_geometry(source_size, target_size)
    picture = picture.resize((resized_w, resized_h), Image.LANCZOS)
    picture = picture.crop((left, top, left + target_size[1], top + target_size[0]))
    return np.asarray(picture, np.float32) / 127.5 - 1.0, source_size


def report_stage(message: str, enabled: bool = True) -> None:
    """Say on stderr (where the progress bars go) which stage of a run starts."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def check_num_frames(num_frames: int, name: str = "num_frames") -> None:
    """Raise a one-line ValueError naming the nearest valid counts unless `num_frames` is 8k+1 with k >= 1 (latent
    frames are 8 pixel frames apart, and frame 0 is the given image)."""
    if num_frames >= 9 and (num_frames - 1) % 8 == 0:
        return
    below = num_frames - (num_frames - 1) % 8
    valid = [count for count in (below, below + 8) if count >= 9]
    if len(valid) == 2:
        raise ValueError(f"{name} {num_frames} is not 8k+1; use {valid[0]} or {valid[1]}")
    raise ValueError(f"{name} {num_frames} is too few: the shortest video is 9 frames (8k+1 with k >= 1)")


def check_checkpoint(ckpt_dir, with_text_encoder: bool = True) -> Path:
    """Raise a one-line FileNotFoundError unless `ckpt_dir` holds the converted parts `WorldModel.from_checkpoint`
    loads; returns it as a Path."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} does not exist (convert one with convert_torch_weights.py)")
    required = [pipeline.TRANSFORMER_DIR, pipeline.VAE_DIR] + ([pipeline.TEXT_ENCODER_DIR] if with_text_encoder else [])
    missing = [part for part in required if not (ckpt_dir / part / store.CONFIG_FILE).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {ckpt_dir} lacks {', '.join(missing)}/ (convert them with convert_torch_weights.py"
            f"{'' if pipeline.TEXT_ENCODER_DIR not in missing else '; or pass precomputed --embeddings'})"
        )
    return ckpt_dir


def camera_path(num_frames: int, source_size, target_size, *, intrinsics, action: str | None = None,
                c2w: np.ndarray | None = None, action_convention: str = "sana_wm",
                translation_speed: float | None = None,
                rotation_speed_deg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_frames` poses of an action string or a c2w array (F, 4, 4), with intrinsics ((3,3), (F,3,3),
    (4,) or (F,4) [fx, fy, cx, cy] in source-image pixels) mapped onto the resized and cropped target image.
    An action string is rolled out by `camera.action_string_to_c2w` with the convention and speeds given (None: the
    convention's defaults).

    Returns (c2w (num_frames, 4, 4), intrinsics (num_frames, 4) in target pixels).
    """
    if (action is None) == (c2w is None):
        raise ValueError("give exactly one of an action string or a c2w trajectory")
    check_num_frames(num_frames)
    if action is not None:
        trajectory = camera.action_string_to_c2w(action, convention=action_convention,
                                                 translation_speed=translation_speed,
                                                 rotation_speed_deg=rotation_speed_deg)
    else:
        trajectory = np.asarray(c2w, np.float32)
    if trajectory.ndim != 3 or trajectory.shape[1:] != (4, 4):
        raise ValueError(f"c2w trajectory must be (F, 4, 4), got {trajectory.shape}")
    if len(trajectory) < num_frames:
        raise ValueError(f"the camera trajectory has {len(trajectory)} frames, fewer than the {num_frames} requested")
    per_frame = camera.intrinsics_per_frame(intrinsics, num_frames)
    return trajectory[:num_frames], camera.resize_crop_intrinsics(per_frame, source_size, target_size)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """latents (T, h, w, C) normalised; video (F, H, W, 3) uint8; the camera path (c2w (F, 4, 4) and intrinsics
    (F, 4) in target pixels) the video was generated along."""

    latents: np.ndarray
    video: np.ndarray
    c2w: np.ndarray
    intrinsics: np.ndarray


class BlockReport(NamedTuple):
    """One streamed block: index, latent frames [start, end), pixel frames it adds to the video, wall seconds, and
    its latents (1, end - start, h, w, C)."""

    index: int
    start: int
    end: int
    pixel_frames: int
    seconds: float
    latents: jax.Array | None = None


@dataclasses.dataclass
class WorldModel:
    """The three models of stage 1 and their parameters."""

    model: SanaWMTransformer
    params: dict
    vae_config: vae.VAEConfig
    vae_params: dict
    text_encoder: TextEncoder | None
    target_size: tuple[int, int] = camera.TARGET_SIZE

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype: str = "float32", target_size=camera.TARGET_SIZE,
                        with_text_encoder: bool = True, sharding=None, **config_overrides) -> "WorldModel":
        """Load a directory written by convert_torch_weights.py; `dtype` is the compute (and parameter) dtype.

        `config_overrides` replace DiT config fields (e.g. `gdn_impl="pallas"`, `attention_impl="cudnn"`, `remat`);
        `sharding` places the DiT parameters as in `store.restore_params` (one Sharding or a matching pytree).
        """
        ckpt_dir = check_checkpoint(ckpt_dir, with_text_encoder)
        model, params = pipeline.load_transformer(ckpt_dir, sharding, **{"dtype": dtype, "param_dtype": dtype,
                                                                         **config_overrides})
        vae_config, vae_params = pipeline.load_vae(ckpt_dir, dtype=dtype)
        text_encoder = pipeline.load_text_encoder(ckpt_dir, dtype=dtype) if with_text_encoder else None
        return cls(model, params, vae_config, vae_params, text_encoder, tuple(target_size))

    def encode_prompt(self, prompt: str, negative_prompt: str = "", cfg: bool = True) -> PromptEmbeddings:
        """Gemma-2 conditioning of one prompt (and of the negative prompt when `cfg`)."""
        if self.text_encoder is None:
            raise ValueError("this WorldModel has no text encoder: pass precomputed embeddings")
        embeds, mask = self.text_encoder.encode(prompt)
        negative, negative_mask = self.text_encoder.encode_negative(negative_prompt) if cfg else (None, None)
        return PromptEmbeddings(embeds, mask, negative, negative_mask)

    def prepare(self, image, c2w, intrinsics, seed: int, progress: bool):
        """Camera tensors, first-frame latent and starting noise: (conditions (1, T, 20), plucker (1, T, h, w, 48),
        first_frame (1, 1, h, w, C), noise (1, T, h, w, C))."""
        if tuple(np.shape(image)) != (*self.target_size, 3):
            raise ValueError(f"image must be {(*self.target_size, 3)}, got {np.shape(image)}")
        stride = self.vae_config.encoder_compression
        report_stage("preparing the camera conditioning", progress)
        conditions, plucker = camera.prepare_camera(c2w, intrinsics, self.target_size, stride)
        report_stage("encoding the first frame", progress)
        first_frame = vae.encode(self.vae_params, jnp.asarray(image)[None, None], self.vae_config)
        noise = initial_noise(jax.random.key(seed), first_frame, conditions.shape[0])
        return conditions[None], plucker[None], first_frame, noise

    def generate(self, image, c2w, intrinsics, text: PromptEmbeddings, sampler: SamplerConfig = SamplerConfig(),
                 seed: int = 0, fused: bool = False, progress: bool = True) -> GenerationResult:
        """image (H, W, 3) in [-1, 1] at target size, c2w (F, 4, 4), intrinsics (F, 4) in target pixels.

        The sampler follows the model's mode: all frames jointly (bidirectional) or the chunk-wise schedule
        (chunk_causal; `fused` does not apply). Streaming models generate with `generate_streaming`.
        With `progress`, each stage is named on stderr and denoising and decoding show progress bars.
        """
        mode = self.model.config.mode
        if mode == "streaming":
            raise ValueError("a streaming model generates block by block: use generate_streaming")
        conditions, plucker, first_frame, noise = self.prepare(image, c2w, intrinsics, seed, progress)
        negative = (None, None)
        if sampler.uses_guidance:
            if text.negative_prompt_embeds is None:
                raise ValueError("guidance_scale > 1 needs negative prompt embeddings")
            negative = (text.negative_prompt_embeds, text.negative_prompt_attention_mask)
        inputs = dict(
            first_frame_latent=first_frame, noise=noise,
            text=jnp.asarray(text.prompt_embeds), text_mask=jnp.asarray(text.prompt_attention_mask),
            negative_text=None if negative[0] is None else jnp.asarray(negative[0]),
            negative_text_mask=None if negative[1] is None else jnp.asarray(negative[1]),
            camera_conditions=conditions, chunk_plucker=plucker, config=sampler, progress=progress,
        )
        if mode == "chunk_causal":
            latents = sample_chunk_causal(self.model, self.params, **inputs)
        else:
            latents = sample(self.model, self.params, fused=fused, **inputs)
        video = vae.decode_tiled(self.vae_params, latents, self.vae_config,
                                 out=np.empty(self.video_shape(latents.shape[1]), np.uint8), progress=progress)
        return GenerationResult(np.asarray(latents[0]), video[0], np.asarray(c2w), np.asarray(intrinsics))

    def generate_streaming(self, image, c2w, intrinsics, text: PromptEmbeddings,
                           sampler: StreamingSamplerConfig = StreamingSamplerConfig(), seed: int = 0,
                           progress: bool = True, on_block=None, on_frames=None) -> GenerationResult:
        """`generate` for a streaming model: blocks of latent frames denoised one after the other
        (`diffusion.streaming`), each decoded as soon as it is done when the VAE's decoder is causal (the streaming
        release's ltx2_causal_vae); with a non-causal decoder the clip is decoded at the end.

        on_block: called with a `BlockReport` after each block (its wall time includes its decoding).
        on_frames: called with each block's decoded frames (n, H, W, 3) uint8 as they come (causal decoder only).
        """
        if self.model.config.mode != "streaming":
            raise ValueError(f"generate_streaming needs a streaming model, not mode {self.model.config.mode!r}")
        conditions, plucker, first_frame, noise = self.prepare(image, c2w, intrinsics, seed, progress)
        decoder = BlockDecoder(self) if self.vae_config.decoder_causal else None
        report_stage("denoising block by block" + (" and decoding each block" if decoder else ""), progress)
        latents, frames = [], []
        clock = time.perf_counter()
        for block in stream_sample(self.model, self.params, first_frame_latent=first_frame, noise=noise,
                                   text=jnp.asarray(text.prompt_embeds),
                                   text_mask=jnp.asarray(text.prompt_attention_mask), camera_conditions=conditions,
                                   chunk_plucker=plucker, config=sampler):
            latents.append(np.asarray(block.latents[0]))
            if decoder is not None:
                frames.append(decoder(block.latents))
                if on_frames is not None:
                    on_frames(frames[-1])
            report = BlockReport(block.index, block.start, block.end, self.pixel_frames(block.start, block.end),
                                 time.perf_counter() - clock, block.latents)
            if on_block is not None:
                on_block(report)
            clock = time.perf_counter()
        latents = np.concatenate(latents, axis=0)
        if decoder is None:
            video = vae.decode_tiled(self.vae_params, latents[None], self.vae_config,
                                     out=np.empty(self.video_shape(len(latents)), np.uint8), progress=progress)[0]
        else:
            video = np.concatenate(frames, axis=0)
        return GenerationResult(latents, video, np.asarray(c2w), np.asarray(intrinsics))

    def video_shape(self, num_latent_frames: int) -> tuple[int, ...]:
        return (1, self.vae_config.num_pixel_frames(num_latent_frames), *self.target_size, 3)

    def pixel_frames(self, start: int, end: int) -> int:
        """How many pixel frames latent frames [start, end) of a clip decode to."""
        return self.vae_config.num_pixel_frames(end) - (self.vae_config.num_pixel_frames(start) if start else 0)


class BlockDecoder:
    """Consecutive latent blocks (1, n, h, w, C) of one clip -> their pixel frames (m, H, W, 3) uint8, decoded as
    they come by the world model's causal VAE decoder (what decoding the whole clip gives)."""

    def __init__(self, world: WorldModel):
        self.params, self.decoder, self.cache = world.vae_params, vae.CausalDecoder(world.vae_config), None

    def __call__(self, latents) -> np.ndarray:
        if self.cache is None:
            self.cache = self.decoder.init_cache(1, *latents.shape[2:4])
        pixels, self.cache = self.decoder.decode_chunk(self.params, latents, self.cache)
        return vae.video_to_uint8(pixels[0])


@dataclasses.dataclass
class Refiner:
    """Stage 2: the LTX-2 refiner transformer, its parameters and its Gemma-3 + connectors text encoder."""

    model: RefinerTransformer
    params: dict
    text_encoder: RefinerTextEncoder

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype: str | None = None, sharding=None) -> "Refiner":
        """`ckpt_dir/refiner/` (or a refiner-only directory) written by convert_torch_weights.py --refiner."""
        return cls(*load_refiner_components(ckpt_dir, sharding, dtype=dtype))

    def start_stream(self, prompt: str, *, fps: float = DEFAULT_FPS, seed: int = 42) -> RefinerStream:
        """A chunk-causal stream for refining stage-1 latents (1, n, h, w, C) pushed block by block as they are
        produced (`push`, then `finish`); it refines what `refine` does for the whole clip with the same seed."""
        text, mask = self.text_encoder.encode(prompt)
        return RefinerStream(self.model, self.params, text, mask, fps=fps, key=jax.random.key(seed))


def refine(world: WorldModel, refiner: Refiner, result: GenerationResult, prompt: str, *, fps: float = DEFAULT_FPS,
           seed: int = 42, progress: bool = True) -> GenerationResult:
    """Stage 2 on a stage-1 result: the refined latents (sink frame unchanged) decoded with the stage-1 VAE, the
    first decoded frame dropped as diffusers' refiner does (so the video and camera path are one frame shorter)."""
    report_stage("encoding the prompt for the refiner", progress)
    text, mask = refiner.text_encoder.encode(prompt)
    latents = jnp.asarray(result.latents)[None]
    noise = frame_noise(jax.random.key(seed), latents.shape)
    report_stage("refining", progress)
    refined = refine_latents(refiner.model, refiner.params, latents, text, mask, noise, fps=fps, progress=progress)
    return refined_result(world, refined, result, progress)


def refined_result(world: WorldModel, refined, result: GenerationResult, progress: bool = True) -> GenerationResult:
    """Refined latents (1, T, h, w, C) of a stage-1 `result` -> their result: decoded with the stage-1 VAE, the first
    decoded frame dropped as diffusers' refiner does (the video and camera path are one frame shorter)."""
    video = vae.decode_tiled(world.vae_params, refined, world.vae_config,
                             out=np.empty(world.video_shape(refined.shape[1]), np.uint8), progress=progress)
    return GenerationResult(np.asarray(refined[0]), video[0, SINK_SIZE:], result.c2w[SINK_SIZE:],
                            result.intrinsics[SINK_SIZE:])


class StreamingRefinement:
    """Stage 2 block by block beside a streaming stage 1: `push` each stage-1 block's latents (1, n, h, w, C) as it is
    produced; the chunk-causal `stream` (`Refiner.start_stream`) refines every block that became complete and, with
    a causal VAE decoder, the refined frames are decoded at once, the sink's first decoded frame dropped as `refine`
    drops it. `finish` refines what is left and returns the refined result (decoded there with a non-causal decoder).

    on_block: called after each push or finish that refined frames with a `BlockReport` of the latent frames it
      returned (the sink included), the refined pixel frames they add and the seconds it took to refine and decode.
    on_frames: called with those refined frames (n, H, W, 3) uint8 as they come (causal decoder only).
    """

    def __init__(self, world: WorldModel, stream: RefinerStream, *, on_block=None, on_frames=None):
        self.world, self.stream, self.on_block, self.on_frames = world, stream, on_block, on_frames
        self.decoder = BlockDecoder(world) if world.vae_config.decoder_causal else None
        self.latents, self.frames = [], []

    def push(self, latents) -> None:
        self._refine(self.stream.push, latents)

    def finish(self, result: GenerationResult) -> GenerationResult:
        """The refined result of the stage-1 `result` whose latents were pushed (one frame shorter, as `refine`)."""
        self._refine(self.stream.finish)
        refined = jnp.concatenate(self.latents, axis=1)
        if self.decoder is None:
            return refined_result(self.world, refined, result, progress=False)
        return GenerationResult(np.asarray(refined[0]), np.concatenate(self.frames), result.c2w[SINK_SIZE:],
                                result.intrinsics[SINK_SIZE:])

    def _refine(self, step, *args) -> None:
        clock = time.perf_counter()
        pieces = step(*args)
        if not pieces:
            return
        start, end = pieces[0][0], pieces[-1][1]
        latents = jax.block_until_ready(jnp.concatenate([frames for _, _, frames in pieces], axis=1))
        self.latents.append(latents)
        dropped = SINK_SIZE if start == 0 else 0
        if self.decoder is not None:
            self.frames.append(self.decoder(latents)[dropped:])
            if self.on_frames is not None:
                self.on_frames(self.frames[-1])
        if self.on_block is not None:
            self.on_block(BlockReport(len(self.latents) - 1, start, end,
                                      self.world.pixel_frames(start, end) - dropped, time.perf_counter() - clock,
                                      latents))


def overlay_states(c2w, action: str | None, action_convention: str = "sana_wm",
                   translation_speed: float | None = None,
                   rotation_speed_deg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(key_levels (F, 8), look (F, 2)) of the overlay: the keys of the `action` string, or without one the keys read
    back from the c2w path at the given speeds (None: the convention's)."""
    if action is not None:
        return camera.action_key_states(action, convention=action_convention)
    return camera.c2w_key_states(c2w, convention=action_convention, translation_speed=translation_speed,
                                 rotation_speed_deg=rotation_speed_deg)


def write_outputs(path, result: GenerationResult, fps: float = DEFAULT_FPS, *, action: str | None = None,
                  action_convention: str = "sana_wm", translation_speed: float | None = None,
                  rotation_speed_deg: float | None = None, action_overlay: bool = True,
                  write_mp4: bool = True) -> dict[str, Path]:
    """`<path>` (H.264 mp4), `<stem>.latents.npz` (latents (T, h, w, C)) and `<stem>.trajectory.npz` (c2w,
    intrinsics in target pixels, fps) beside it. With `action_overlay` the mp4 shows the WASD + joystick overlay of
    `overlay.draw_action_overlay`: the keys of the `action` string the video followed, or without one the keys read
    back from `result.c2w` at the given speeds (None: the convention's). The .npz files stay clean.

    `write_mp4=False` writes the two .npz files only (the mp4 was written as the video streamed in).

    The files are written under hidden `.<stem>.partial<suffix>` names and renamed once all three are complete, so a
    failed write leaves none of them behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = {
        "video": path,
        "latents": path.with_name(f"{path.stem}.latents.npz"),
        "trajectory": path.with_name(f"{path.stem}.trajectory.npz"),
    }
    video = result.video
    if action_overlay:
        key_levels, look = overlay_states(result.c2w, action, action_convention, translation_speed, rotation_speed_deg)
        video = overlay.draw_action_overlay(video, key_levels[: len(video)], look[: len(video)])
    if not write_mp4:
        del outputs["video"]
    staged = {kind: target.with_name(f".{target.stem}.partial{target.suffix}") for kind, target in outputs.items()}
    try:
        if write_mp4:
            write_video(staged["video"], video, fps=fps, crf=18)
        np.savez(staged["latents"], latents=result.latents)
        np.savez(staged["trajectory"], c2w=result.c2w, intrinsics=result.intrinsics, fps=np.float32(fps))
        for kind, target in outputs.items():
            os.replace(staged[kind], target)
    finally:
        for partial in staged.values():
            partial.unlink(missing_ok=True)
    return outputs
