"""Released refiner folders -> our checkpoint format, converted shard by shard, and loaded back.

Release layouts (both load; `src` is the release root or its refiner folder):
  SANA-WM_bidirectional: refiner/{transformer,connectors,text_encoder}/ (tokenizer files in refiner/tokenizer/ or the
      text encoder folder)
  SANA-WM_streaming: refiner_diffusers/{transformer,connectors}/ + gemma3_12b/ (Gemma-3 with its tokenizer)
Ours: DIR/{transformer,connectors,text_encoder}/, each `config.json` + `params/part-NNNNN/` (one part per source
shard, so conversion holds one shard's tensors at a time); the text encoder folder keeps the tokenizer files.
Conversion is strict (missing / unexpected / mis-shaped keys are reported together); the audio stream's tensors and
Gemma-3's vision tower are skipped and listed in one line each.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.keymap import convert_tensor_groups, flatten
from sanawm_jax.models.gemma.checkpoint import abstract_gemma3_params, gemma3_naming, open_hf_safetensors
from sanawm_jax.models.gemma.encoder import TOKENIZER_FILE_PATTERNS, TOKENIZER_FILES, load_tokenizer
from sanawm_jax.models.gemma.gemma3 import Gemma3Config
from sanawm_jax.models.refiner.checkpoint import (
    abstract_connector_params,
    abstract_refiner_params,
    convert_groups,
    open_folder,
)
from sanawm_jax.models.refiner.config import ConnectorsConfig, RefinerConfig
from sanawm_jax.models.refiner.prompt import RefinerTextEncoder
from sanawm_jax.models.refiner.transformer import RefinerTransformer

TRANSFORMER_DIR, CONNECTORS_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = "transformer", "connectors", "text_encoder", "tokenizer"
REFINER_DIRS = ("refiner", "refiner_diffusers")
STREAMING_GEMMA_DIR = "gemma3_12b"


@dataclasses.dataclass(frozen=True)
class RefinerFolders:
    layout: str
    transformer: Path
    connectors: Path
    text_encoder: Path
    tokenizer: Path | None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def find_refiner_folders(src) -> RefinerFolders:
    """The component folders of a released refiner (either layout)."""
    src = Path(src)
    base = next((folder for folder in (*(src / name for name in REFINER_DIRS), src)
                 if (folder / TRANSFORMER_DIR).is_dir() and (folder / CONNECTORS_DIR).is_dir()), None)
    if base is None:
        raise FileNotFoundError(f"{src}: no refiner folder (expected {{{','.join(REFINER_DIRS)}}}/transformer/ and "
                                "connectors/ in a release root, or transformer/ and connectors/ here)")
    candidates = (("bidirectional", base / TEXT_ENCODER_DIR), ("streaming", base.parent / STREAMING_GEMMA_DIR))
    found = next(((layout, folder) for layout, folder in candidates if folder.is_dir()), None)
    if found is None:
        raise FileNotFoundError(f"{base}: no Gemma-3 text encoder ({base / TEXT_ENCODER_DIR} or "
                                f"{base.parent / STREAMING_GEMMA_DIR})")
    layout, text_encoder = found
    tokenizer = next((folder for folder in (base / TOKENIZER_DIR, text_encoder, text_encoder / TOKENIZER_DIR)
                      if has_tokenizer(folder)), None)
    return RefinerFolders(layout, base / TRANSFORMER_DIR, base / CONNECTORS_DIR, text_encoder, tokenizer)


def write_converted(out_dir: Path, groups, config) -> None:
    """Converted parameter groups (one per source shard) -> `out_dir` as `config.json` + one orbax part per group."""
    store.save_params_in_parts(out_dir, groups, config.to_dict())


def write_refiner(src, out_dir, *, param_dtype: str = "bfloat16", log=print) -> Path:
    """Convert a released refiner into `out_dir` (created; must not hold params). Parameters are stored in
    `param_dtype` (bfloat16 by default, the release's own dtype: float32 would double 32 GB)."""
    folders = find_refiner_folders(src)
    out_dir = Path(out_dir)
    log(f"refiner: {folders.layout} layout at {folders.transformer.parent}")
    for name, folder, config_class in ((TRANSFORMER_DIR, folders.transformer, RefinerConfig),
                                       (CONNECTORS_DIR, folders.connectors, ConnectorsConfig)):
        source, config = open_folder(folder, config_class, param_dtype=param_dtype, dtype=param_dtype)
        log(f"refiner {name}: converting {source.description}")
        write_converted(out_dir / name, convert_groups(source, config, log), config)

    source = open_hf_safetensors(folders.text_encoder)
    config = Gemma3Config.from_hf_config(source.config, param_dtype=param_dtype, dtype=param_dtype)
    log(f"refiner text encoder: converting {source.description}")
    to_key, is_unused = gemma3_naming(source)
    target = out_dir / TEXT_ENCODER_DIR
    write_converted(target, convert_tensor_groups(source, flatten(abstract_gemma3_params(config)), to_key,
                                                  "the Gemma-3 config", is_unused, log), config)
    if folders.tokenizer is None:
        log("refiner text encoder: no tokenizer files found; add tokenizer.json to "
            f"{target} before refining from prompts")
    else:
        for pattern in TOKENIZER_FILE_PATTERNS:
            for path in folders.tokenizer.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, target / path.name)
    return out_dir


def convert_refiner_release(src, out_dir, *, param_dtype: str = "bfloat16", log=print) -> Path:
    """`write_refiner` into a staging sibling of `out_dir` that becomes `out_dir` only when everything converted."""
    with store.staged_directory(out_dir) as staging:
        write_refiner(src, staging, param_dtype=param_dtype, log=log)
    return Path(out_dir).absolute()


def load_refiner_components(ckpt_dir, sharding=None, *, dtype: str | None = None, tokenizer=None):
    """Our converted refiner (`ckpt_dir` or `ckpt_dir/refiner`) -> (RefinerTransformer, params, RefinerTextEncoder).

    dtype: compute dtype of all three models (default: as saved). tokenizer: overrides the saved tokenizer files.
    """
    root = Path(ckpt_dir) / "refiner" if (Path(ckpt_dir) / "refiner").is_dir() else Path(ckpt_dir)
    overrides = {} if dtype is None else {"dtype": dtype}
    read = lambda name, cls: cls.from_dict(store.read_config(root / name)).replace(**overrides)
    config = read(TRANSFORMER_DIR, RefinerConfig)
    params = store.restore_params(root / TRANSFORMER_DIR, abstract_refiner_params(config), sharding)
    connectors_config = read(CONNECTORS_DIR, ConnectorsConfig)
    connectors = store.restore_params(root / CONNECTORS_DIR, abstract_connector_params(connectors_config))
    gemma_config = read(TEXT_ENCODER_DIR, Gemma3Config)
    gemma = store.restore_params(root / TEXT_ENCODER_DIR, abstract_gemma3_params(gemma_config), sharding)
    encoder = RefinerTextEncoder(tokenizer or load_tokenizer(root / TEXT_ENCODER_DIR), gemma_config, gemma,
                                 connectors_config, connectors)
    return RefinerTransformer(config), params, encoder
