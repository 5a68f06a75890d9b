"""The embedded default of `sample.py`: tiny models, a byte-level tokenizer, and a bundled first frame (a synthetic
courtyard) with its intrinsics, so the whole pipeline runs on a fresh machine without downloads.

In the bidirectional mode the DiT and the VAE carry trained weights (`DEMO_WEIGHTS`, built by
`python -m sanawm_jax.demo_weights`): the VAE was trained as an autoencoder on synthetic courtyards and the DiT on
their latents, so the video shows the courtyard moving along the camera path. The text encoder keeps seeded random
weights (the DiT was trained on its embeddings of the scenes' captions), and so does every model of the other modes,
which have no trained tiny weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import jax
import numpy as np

from sanawm_jax.data.cache import cache_latents, cache_text, source_captions
from sanawm_jax.data.format import TextEmbeddingStore
from sanawm_jax.data.sources import ClipDirectorySource
from sanawm_jax.data.synthetic import write_synthetic_dataset
from sanawm_jax.generate import Refiner, WorldModel
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.models.gemma.checkpoint import abstract_gemma2_params
from sanawm_jax.models.gemma.encoder import TextEncoder
from sanawm_jax.models.gemma.checkpoint import abstract_gemma3_params
from sanawm_jax.models.gemma.gemma2 import Gemma2Config
from sanawm_jax.models.gemma.gemma3 import Gemma3Config
from sanawm_jax.models.ltx2_vae import VAE_PRESETS, abstract_vae_params
from sanawm_jax.models.refiner.checkpoint import abstract_connector_params, abstract_refiner_params
from sanawm_jax.models.refiner.config import CONNECTOR_PRESETS, REFINER_PRESETS
from sanawm_jax.models.refiner.prompt import RefinerTextEncoder
from sanawm_jax.models.refiner.transformer import RefinerTransformer
from sanawm_jax.models.sana_wm.config import PRESETS, SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params

TARGET_SIZE = (128, 224)
EXAMPLE_IMAGE = "courtyard.png"
EXAMPLE_INTRINSICS = "courtyard.json"
DEMO_WEIGHTS = "demo_weights.safetensors"
TRAINED_MODES = ("bidirectional",)
TEXT_ENCODER_SEED = 0  # the random text encoder the trained DiT was trained with
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
REFINER_TEXT_LENGTH = 64  # tokens (the release: 1024)
DEMO_DATA = {"num_clips": 4, "num_frames": 17, "height": 64, "width": 96}


def asset_path(name: str):
    return resources.files("sanawm_jax") / "assets" / name


def example_description() -> dict:
    """What `courtyard.json` records of the bundled first frame: "intrinsics" [fx, fy, cx, cy] in its pixels,
    "caption", and "synthetic_clip" {"seed", "index", "num_frames"}, the held-out synthetic clip whose first frame
    it is (`data.synthetic.generate_clip(seed, index, num_frames, *TARGET_SIZE)` renders its ground truth)."""
    return json.loads(asset_path(EXAMPLE_INTRINSICS).read_text())


def example_intrinsics() -> list[float]:
    """[fx, fy, cx, cy] of the bundled example image, in its pixels."""
    return example_description()["intrinsics"]


def byte_tokenizer():
    """A Gemma-like fast tokenizer over the 256 byte symbols (pad 0, eos 1, bos 2, unk 3; BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_gemma_config(hidden_size: int, vocab_size: int) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        query_pre_attn_scalar=hidden_size // 4, sliding_window=64,
    )


def default_action(num_frames: int) -> str:
    """The demo's camera path for `num_frames` frames: forward for the first half, forward while turning left for
    the rest (an action string of num_frames - 1 held-key frames rolls out to num_frames poses)."""
    if num_frames < 3:
        raise ValueError(f"the demo camera path needs at least 3 frames, got {num_frames}")
    forward = (num_frames - 1) // 2
    return f"w-{forward},aw-{num_frames - 1 - forward}"


def random_params(abstract, rng: np.random.Generator) -> dict:
    """Random weights for a tree of jax.ShapeDtypeStruct, drawn on the host: no XLA program to compile (the models'
    own initialisers draw every array in its own random program, which takes tens of seconds to compile on a CPU).

    Arrays of two or more dimensions (kernels, embeddings, modulation tables) ~ N(0, 1/fan_in), fan_in the product
    of all but the last dimension (the variance of LeCun-normal initialisation); vectors are ones for norm scales and
    the VAE's latent std, zeros otherwise (biases, the VAE's latent mean, the GDN decay parameters).
    """

    def draw(path, leaf):
        if len(leaf.shape) >= 2:
            value = rng.standard_normal(leaf.shape, np.float32) / math.sqrt(math.prod(leaf.shape[:-1]))
        else:
            value = np.full(leaf.shape, path[-1].key in ("scale", "latents_std"), np.float32)
        return value.astype(leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, abstract))


def demo_config(**config_overrides):
    """The tiny DiT config of the demo (its input channels those of the tiny VAE), with `config_overrides`."""
    vae_config = VAE_PRESETS["ltx2_video_tiny"]
    return PRESETS["sana_wm_tiny"].replace(in_channels=vae_config.latent_channels, **config_overrides)


def random_world_model(seed: int = 0, **config_overrides) -> WorldModel:
    """Tiny DiT, VAE and Gemma-2 with `random_params` drawn from `seed`; `config_overrides` replace DiT config
    fields (e.g. `gdn_impl`, `attention_impl`, `mode`). A streaming DiT comes with a causal VAE decoder (as the
    streaming release's ltx2_causal_vae), so its blocks decode as they are generated."""
    vae_config = VAE_PRESETS["ltx2_video_tiny"]
    if config_overrides.get("mode") == "streaming":
        vae_config = vae_config.replace(decoder_causal=True)
    config = demo_config(**config_overrides)
    tokenizer = byte_tokenizer()
    gemma_config = tiny_gemma_config(config.caption_channels, len(tokenizer))
    rng = np.random.default_rng(seed)
    return WorldModel(
        model=SanaWMTransformer(config),
        params=random_params(abstract_params(config), rng),
        vae_config=vae_config,
        vae_params=random_params(abstract_vae_params(vae_config), rng),
        text_encoder=TextEncoder(tokenizer, gemma_config, random_params(abstract_gemma2_params(gemma_config), rng)),
        target_size=TARGET_SIZE,
    )


def demo_refiner(seed: int = 0, latent_channels: int | None = None) -> Refiner:
    """Tiny stage-2 refiner (transformer, Gemma-3 of 2 layers and connectors) with `random_params` drawn from `seed`,
    for the demo VAE's latents."""
    latent_channels = latent_channels or VAE_PRESETS["ltx2_video_tiny"].latent_channels
    config = REFINER_PRESETS["ltx2_refiner_tiny"].replace(in_channels=latent_channels, out_channels=latent_channels)
    connectors = CONNECTOR_PRESETS["ltx2_connectors_tiny"]
    tokenizer = byte_tokenizer()
    gemma = Gemma3Config(
        vocab_size=len(tokenizer), hidden_size=connectors.caption_channels, intermediate_size=24,
        num_hidden_layers=connectors.text_proj_in_factor - 1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=connectors.caption_channels // 2, query_pre_attn_scalar=connectors.caption_channels // 2,
        sliding_window=16, sliding_window_pattern=2,
    )
    rng = np.random.default_rng(seed + 1)
    encoder = RefinerTextEncoder(tokenizer, gemma, random_params(abstract_gemma3_params(gemma), rng), connectors,
                                 random_params(abstract_connector_params(connectors), rng),
                                 max_sequence_length=REFINER_TEXT_LENGTH)
    return Refiner(RefinerTransformer(config), random_params(abstract_refiner_params(config), rng), encoder)


def has_trained_weights(**config_overrides) -> bool:
    """Whether `demo_world_model` gives trained weights for these DiT config overrides (the bidirectional mode)."""
    return demo_config(**config_overrides).mode in TRAINED_MODES


def save_trained_weights(path, dit_config, dit_params, vae_config, vae_params) -> Path:
    """One safetensors file: every array under "transformer/<path>" or "vae/<path>" (float32), both configs as
    JSON in its metadata. The bytes are a function of the arrays and configs: the configs are one metadata entry,
    since safetensors writes the entries of its metadata map in an order that varies between calls."""
    from safetensors.numpy import save_file

    tensors = {}
    for prefix, params in (("transformer", dit_params), ("vae", vae_params)):
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
            name = "/".join(str(key.key) for key in key_path)
            tensors[f"{prefix}/{name}"] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    metadata = {"configs": json.dumps({"transformer": dit_config.to_dict(), "vae": vae_config.to_dict()},
                                      sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_trained_weights(path=None, **config_overrides):
    """(DiT config with `config_overrides`, DiT params, VAE config, VAE params) from a file of
    `save_trained_weights` (default: the bundled `DEMO_WEIGHTS`); raises ValueError if its arrays do not match
    the configs it names."""
    from safetensors import safe_open

    path = Path(path) if path is not None else asset_path(DEMO_WEIGHTS)
    with safe_open(str(path), framework="numpy") as stored:
        metadata = stored.metadata()
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    configs = json.loads(metadata["configs"])
    dit_config = SanaWMConfig.from_dict(configs["transformer"]).replace(**config_overrides)
    vae_config = vae.VAEConfig.from_dict(configs["vae"])

    def tree(prefix, abstract):
        def take(key_path, leaf):
            name = f"{prefix}/" + "/".join(str(key.key) for key in key_path)
            if name not in tensors or tensors[name].shape != leaf.shape:
                raise ValueError(f"{path}: {name} is {tensors[name].shape if name in tensors else 'absent'}, the "
                                 f"config needs {leaf.shape}")
            return tensors.pop(name)

        return jax.device_put(jax.tree_util.tree_map_with_path(take, abstract))

    dit_params = tree("transformer", abstract_params(dit_config))
    vae_params = tree("vae", abstract_vae_params(vae_config))
    if tensors:
        raise ValueError(f"{path}: arrays the configs do not have: {sorted(tensors)[:3]}")
    return dit_config, dit_params, vae_config, vae_params


def demo_world_model(seed: int = 0, **config_overrides) -> WorldModel:
    """The embedded demo models. Bidirectional mode (`has_trained_weights`): the trained DiT and VAE of
    `DEMO_WEIGHTS` and the random text encoder of `TEXT_ENCODER_SEED` (`seed` then only seeds the sampling noise,
    not these models); other modes: `random_world_model(seed)`. `config_overrides` replace DiT config fields."""
    if not has_trained_weights(**config_overrides):
        return random_world_model(seed, **config_overrides)
    world = random_world_model(TEXT_ENCODER_SEED, **config_overrides)
    dit_config, dit_params, vae_config, vae_params = load_trained_weights(**config_overrides)
    return dataclasses.replace(world, model=SanaWMTransformer(dit_config), params=dit_params,
                               vae_config=vae_config, vae_params=vae_params)


def build_demo_dataset(data_dir, seed: int = 0) -> tuple[Path, Path]:
    """The embedded default dataset of `train.py`: synthetic clips with latents and caption embeddings from the tiny
    demo models, in `data_dir/clips` and `data_dir/text` (kept if already complete); returns both directories."""
    clips_dir, text_dir = Path(data_dir) / "clips", Path(data_dir) / "text"
    if (clips_dir / "clips.jsonl").is_file() and (text_dir / "null.npz").is_file():
        return clips_dir, text_dir
    world = demo_world_model(seed)
    write_synthetic_dataset(
        clips_dir, DEMO_DATA["num_clips"], DEMO_DATA["num_frames"], DEMO_DATA["height"],
        DEMO_DATA["width"], seed=seed,
    )

    def encode_video(video: np.ndarray) -> np.ndarray:
        return np.asarray(vae.encode(world.vae_params, video[None], world.vae_config)[0])

    cache_latents(clips_dir, encode_video, (DEMO_DATA["height"], DEMO_DATA["width"]))

    def encode_text(captions: list[str]):
        return world.text_encoder.encode(captions)

    cache_text(source_captions(ClipDirectorySource(clips_dir)), encode_text, TextEmbeddingStore(text_dir))
    return clips_dir, text_dir
