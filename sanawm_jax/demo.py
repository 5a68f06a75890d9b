"""The embedded default of `sample.py`: tiny models with seeded random weights, a byte-level tokenizer, and a bundled
first frame with its intrinsics, so the whole pipeline runs on a fresh machine without downloads. The video it makes
is not meaningful (the weights are random); it exercises every stage end to end."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.data.cache import cache_latents, cache_text, source_captions
from sanawm_jax.data.format import TextEmbeddingStore
from sanawm_jax.data.sources import ClipDirectorySource
from sanawm_jax.data.synthetic import write_synthetic_dataset
from sanawm_jax.generate import WorldModel
from sanawm_jax.models import ltx2_vae as vae
from sanawm_jax.models.gemma.encoder import TextEncoder
from sanawm_jax.models.gemma.gemma2 import Gemma2Config, Gemma2Model
from sanawm_jax.models.ltx2_vae import VAE_PRESETS, init_vae_params
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, init_params

TARGET_SIZE = (128, 224)
EXAMPLE_IMAGE = "example.png"
EXAMPLE_INTRINSICS = "example_intrinsics.json"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
DEMO_DATA = {"num_clips": 4, "num_frames": 17, "height": 64, "width": 96}


def asset_path(name: str):
    return resources.files("sanawm_jax") / "assets" / name


def example_intrinsics() -> list[float]:
    """[fx, fy, cx, cy] of the bundled example image, in its pixels."""
    return json.loads(asset_path(EXAMPLE_INTRINSICS).read_text())["intrinsics"]


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


def demo_world_model(seed: int = 0) -> WorldModel:
    """Tiny DiT, VAE and Gemma-2 with weights drawn from `seed`."""
    vae_config = VAE_PRESETS["ltx2_video_tiny"]
    config = PRESETS["sana_wm_tiny"].replace(in_channels=vae_config.latent_channels)
    tokenizer = byte_tokenizer()
    gemma_config = tiny_gemma_config(config.caption_channels, len(tokenizer))
    dit_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    tokens = jnp.ones((1, 4), jnp.int32)
    gemma_params = jax.jit(lambda key: Gemma2Model(gemma_config).init(key, tokens, tokens)["params"])(text_key)
    return WorldModel(
        model=SanaWMTransformer(config),
        params=init_params(config, dit_key),
        vae_config=vae_config,
        vae_params=jax.jit(lambda key: init_vae_params(vae_config, key))(vae_key),
        text_encoder=TextEncoder(tokenizer, gemma_config, gemma_params),
        target_size=TARGET_SIZE,
    )


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

    def null_text():
        embedding, mask = world.text_encoder.encode_negative("")
        return np.asarray(embedding[0]), np.asarray(mask[0])

    cache_text(source_captions(ClipDirectorySource(clips_dir)), encode_text, TextEmbeddingStore(text_dir),
               null_text_fn=null_text)
    return clips_dir, text_dir
