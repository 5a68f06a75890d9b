"""Whole-pipeline checkpoints: the DiT, the LTX-2 VAE and the Gemma-2 text encoder (with its tokenizer) converted
from their released PyTorch/Hugging Face files into one directory of our format (see `checkpoint.store`), and loaded
back (`load_transformer`, `load_vae`, `load_text_encoder`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.torch_sources import open_torch_checkpoint
from sanawm_jax.models.gemma.checkpoint import abstract_gemma2_params, load_gemma2
from sanawm_jax.models.gemma.encoder import TOKENIZER_FILE_PATTERNS, TextEncoder, load_tokenizer
from sanawm_jax.models.gemma.gemma2 import Gemma2Config
from sanawm_jax.models.ltx2_vae import VAEConfig, abstract_vae_params, convert_vae
from sanawm_jax.models.refiner.release import find_refiner_folders, write_refiner
from sanawm_jax.models.sana_wm.checkpoint import (
    NULL_CAPTION_FILE,
    NULL_CAPTION_KEY,
    TRANSFORMER_DIR,
    checkpoint_mode,
    convert_transformer,
    detect_layout,
    load_transformer,
    resolve_mode,
    save_transformer,
)
from sanawm_jax.models.sana_wm.config import SanaWMConfig

VAE_DIR = "vae"
REFINER_DIR = "refiner"
CAUSAL_VAE_DIR = "ltx2_causal_vae"  # the streaming release's VAE (a causal decoder), used when a root has no vae/
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
NVLABS_DIT_DIR = "dit"  # NVlabs release folders: dit/<name>.safetensors, vae/, refiner/, config.yaml
NVLABS_STREAMING_DIT = "sana_dit/model.pt"  # the streaming release folder's DiT


__all__ = ["checkpoint_mode", "convert_pipeline", "load_text_encoder", "load_transformer", "load_vae"]


def _present(folder: Path | None) -> Path | None:
    return folder if folder is not None and folder.is_dir() else None


def _dit_source(src: Path) -> Path:
    """`src`, or the DiT file of an NVlabs release folder (`dit/<name>.safetensors` beside `vae/`, or the streaming
    release's `sana_dit/model.pt`)."""
    if not src.is_dir() or (src / "config.json").exists() or (src / TRANSFORMER_DIR).is_dir():
        return src
    dit_files = sorted((src / NVLABS_DIT_DIR).glob("*.safetensors")) + sorted(src.glob(NVLABS_STREAMING_DIT))
    if len(dit_files) > 1:
        raise ValueError(f"{src}: several DiT files in {NVLABS_DIT_DIR}/ ({', '.join(p.name for p in dit_files)}); "
                         "give one of them as the source")
    return dit_files[0] if dit_files else src


def _given(folder, what: str) -> Path:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such {what} folder")
    return Path(folder)


def convert_pipeline(src, out_dir, config: SanaWMConfig | None = None, *, mode: str | None = None, vae=None,
                     text_encoder=None, tokenizer=None, refiner=None, log=print) -> Path:
    """Convert a released SANA-WM pipeline into `out_dir/{transformer,vae,text_encoder}` (and `refiner/`).

    src: a DiT of any of the three kinds: a diffusers pipeline root or transformer folder, an NVlabs release folder
    (bidirectional or chunk-causal `dit/*.safetensors`, streaming `sana_dit/model.pt`) or that file, or a torch
    pickle. Its kind (`detect_dit_kind`) becomes the `mode` of the converted config; `mode` names it when the files do
    not, and a `mode` they contradict is refused. Released checkpoints of other models (refiner, a VAE) are refused
    by name.
    vae / text_encoder / tokenizer: folders of the other components; by default the `vae/` (else `ltx2_causal_vae/`),
    `text_encoder/` and `tokenizer/` subfolders of a pipeline or release root `src`, when present. Components that are
    not found are skipped (and said so); the DiT is always converted.
    refiner: a released stage-2 refiner (either release layout, see `models.refiner.release`), written to
    `out_dir/refiner/` shard by shard in bfloat16. The DiT config comes from `config`, else from the source's
    config.json. Everything is written into a temporary sibling of `out_dir` that becomes `out_dir` only when all
    succeeded.
    """
    src = Path(src)
    source = open_torch_checkpoint(_dit_source(src))
    kind = resolve_mode(source, mode)
    if config is None:
        if source.config is None:
            raise ValueError(f"{source.description} carries no config.json: pass a config (e.g. --config sana_wm_2.6b)")
        config = SanaWMConfig.from_diffusers_config(source.config)
    config = config.replace(**{**(kind.fields or {}), "mode": kind.mode})
    root = src if src.is_dir() else None
    default_vae = _present(root and root / VAE_DIR) or _present(root and root / CAUSAL_VAE_DIR)
    vae = _given(vae, "VAE") if vae else default_vae
    text_encoder = _given(text_encoder, "text encoder") if text_encoder else _present(root and root / TEXT_ENCODER_DIR)
    tokenizer = _given(tokenizer, "tokenizer") if tokenizer else _present(root and root / TOKENIZER_DIR) or text_encoder
    if text_encoder is not None:
        load_tokenizer(tokenizer)  # an unusable tokenizer fails before anything is converted
    if refiner is not None:
        find_refiner_folders(refiner)  # so does a folder that is not a refiner release
    with store.staged_directory(out_dir) as staging:
        log(f"transformer: converting {source.description} ({len(source.keys())} tensors, "
            f"{detect_layout(source.keys())} layout) as a {kind.mode} DiT (by {kind.evidence})")
        params, null_caption = convert_transformer(source, config, log=log)
        save_transformer(staging / TRANSFORMER_DIR, params, config, null_caption)
        if null_caption is not None:
            log(f"transformer: kept {NULL_CAPTION_KEY} {null_caption.shape} as the null caption embedding "
                f"({NULL_CAPTION_FILE})")

        if vae is None:
            log("vae: no folder given or found, skipped")
        else:
            vae_config, vae_params = convert_vae(vae)
            log(f"vae: converted {vae} ({'causal' if vae_config.decoder_causal else 'non-causal'} decoder)")
            store.save_params(staging / VAE_DIR, vae_params, vae_config.to_dict())

        if text_encoder is None:
            log("text encoder: no folder given or found, skipped")
        else:
            gemma_config, gemma_params = load_gemma2(text_encoder, log=log)
            target = staging / TEXT_ENCODER_DIR
            store.save_params(target, gemma_params, gemma_config.to_dict())
            for pattern in TOKENIZER_FILE_PATTERNS:
                for path in tokenizer.glob(pattern):
                    shutil.copy2(path, target / path.name)
            log(f"text encoder: converted {text_encoder} (tokenizer from {tokenizer})")
        if refiner is not None:
            write_refiner(refiner, staging / REFINER_DIR, log=log)
    out_dir = Path(out_dir).absolute()
    log(f"wrote {out_dir}")
    return out_dir


def load_vae(ckpt_dir, sharding=None, **config_overrides) -> tuple[VAEConfig, dict]:
    """`(VAEConfig, params)` from `ckpt_dir/vae` (or a VAE-only directory); overrides e.g. `dtype="bfloat16"`.
    Overriding the temporal causality of the saved encoder or decoder raises a one-line ValueError: the weights were
    trained with it (the streaming release's causal decoder is a checkpoint of its own)."""
    model_dir = store.component_dir(ckpt_dir, VAE_DIR)
    saved = VAEConfig.from_dict(store.read_config(model_dir))
    config = saved.replace(**config_overrides)
    for field in ("encoder_causal", "decoder_causal"):
        if getattr(config, field) != getattr(saved, field):
            raise ValueError(f"{model_dir} holds a VAE with {field}={getattr(saved, field)}; it cannot be loaded with "
                             f"{field}={getattr(config, field)}")
    return config, store.restore_params(model_dir, abstract_vae_params(config), sharding)


def load_text_encoder(ckpt_dir, sharding=None, **config_overrides) -> TextEncoder:
    """The Gemma-2 `TextEncoder` (tokenizer included) from `ckpt_dir/text_encoder`."""
    model_dir = store.component_dir(ckpt_dir, TEXT_ENCODER_DIR)
    config = Gemma2Config.from_dict(store.read_config(model_dir)).replace(**config_overrides)
    params = store.restore_params(model_dir, abstract_gemma2_params(config), sharding)
    return TextEncoder(load_tokenizer(model_dir), config, params)
