"""SANA-WM DiT checkpoints: the key maps of the released layouts, the kind of DiT a checkpoint holds (bidirectional,
chunk-causal or streaming), refusal of released checkpoints of other models, and saving/loading the DiT in our format.

Released layouts of the bidirectional DiT (every tensor's name and shape for the 2.6B model: `released_keys/`):
  * "diffusers": the state dict of diffusers' `SanaWMTransformer3DModel` (a `transformer/` folder).
  * "nvlabs": NVlabs/Sana's flat `dit/sana_wm_1600m_720p.safetensors`: the same names, except that the timestep MLP
    is `t_embedder.mlp.0/2` (diffusers: `t_embedder.linear_1/2`), plus the sin-cos table `pos_embed` and the null
    caption embedding `y_embedder.y_embedding` (what training's text dropout substitutes for the caption).
Both hold the GDN buffer `blocks.N.attn.recall_gate`. The model uses neither `pos_embed` nor `recall_gate` (they are
listed, not converted); the null caption embedding is kept beside the params (`load_null_caption_embedding`).
The chunk-causal and streaming DiTs have the same tensors (one parameter layout, three modes; `detect_dit_kind`):
  * chunk-causal: `SANA-WM_chunk_causal/dit/sana_wm_chunk_causal_1600m_720p.safetensors`, the "nvlabs" layout, with
    `config.yaml` (chunk-causal attention, chunk_size 3) at the repository root.
  * streaming: `SANA-WM_streaming/sana_dit/model.pt`, a torch pickle {"generator": the "nvlabs" layout with the
    prefix "model.", "critic": the distillation's fake-score model, ...}; the generator is converted.

Naming: the Flax tree mirrors the diffusers module path, with `blocks.N` -> `blocks_N`, three wrapper modules folded
away (`t_block.1`, `y_embedder.y_proj`, the `.conv` inside FFN conv layers), and `weight` -> `kernel` (Linear, Conv)
or `scale` (1-D norm weights). Layouts and the strict checks follow `sanawm_jax.checkpoint.keymap`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.keymap import convert_tensors, flatten, torch_name, torch_shape
from sanawm_jax.models.sana_wm.config import SanaWMConfig, mode_fields, mode_of
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params

TRANSFORMER_DIR = "transformer"
NULL_CAPTION_FILE = "null_caption_embedding.npy"
RELEASED_KEYS_DIR = Path(__file__).with_name("released_keys")
LAYOUTS = ("diffusers", "nvlabs")
DIFFUSERS_CLASS = "SanaWMTransformer3DModel"

# (regex on the dotted Flax name, replacement) -> the source key, applied in order.
RENAMES = {
    "diffusers": (
        (r"^t_block\.", "t_block.1."),
        (r"^y_embedder\.", "y_embedder.y_proj."),
        (r"\.(inverted_conv|depth_conv|point_conv)\.", r".\1.conv."),
    ),
}
RENAMES["nvlabs"] = RENAMES["diffusers"] + (
    (r"^t_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^t_embedder\.linear_2\.", "t_embedder.mlp.2."),
)
NULL_CAPTION_KEY = "y_embedder.y_embedding"
NULL_CAPTION_PATH = ("null_caption_embedding",)  # its slot beside the params while converting
POS_EMBED_KEY = "pos_embed"
RECALL_GATE = r"^blocks\.\d+\.attn\.recall_gate$"
KNOWN_UNUSED = {"diffusers": (RECALL_GATE,), "nvlabs": (RECALL_GATE, rf"^{POS_EMBED_KEY}$")}
# Sizes of the released NVlabs config behind the tensors outside the params: model_max_length 300 (rows of the null
# caption embedding, as many as text tokens) and image_size 720 over the VAE stride 32 (pos_embed: a 22 x 22 grid).
RELEASED_TEXT_TOKENS = 300
RELEASED_POS_EMBED_GRID = 720 // 32

# Other released checkpoints, recognised to refuse them by name.
REFINER_ADVICE = "give its release folder as the refiner (--refiner), not as the DiT"
VAE_ADVICE = "give it as the VAE (--vae), not as the DiT"
OTHER_DIFFUSERS_CLASSES = {  # _class_name: (what it is, what to do)
    "SanaWMLTX2RefinerTransformer3DModel": ("a SANA-WM stage-2 refiner transformer folder", REFINER_ADVICE),
    "LTX2TextConnectors": ("a SANA-WM refiner text-connector folder", REFINER_ADVICE),
    "AutoencoderKLLTX2Video": ("an LTX-2 video VAE folder", VAE_ADVICE),
    "AutoencoderKLCausalLTX2Video": ("a causal LTX-2 video VAE folder (the streaming release's ltx2_causal_vae)",
                                     VAE_ADVICE),
}
# The streaming release's sana_dit/model.pt is the distillation trainer's save: {"generator": state dict,
# "critic": state dict, ...}; its generator is the streaming student (`torch_sources` takes it).
GENERATOR_KEY = "generator"


def torch_key(path: tuple[str, ...], layout: str = "diffusers") -> str:
    """("blocks_3", "attn", "qkv", "kernel") -> "blocks.3.attn.qkv.weight": the key a parameter is read from."""
    if path == NULL_CAPTION_PATH:
        return NULL_CAPTION_KEY
    name = torch_name(path, numbered="blocks")
    for pattern, replacement in RENAMES[layout]:
        name = re.sub(pattern, replacement, name)
    return name


def expected_tensors(config: SanaWMConfig, layout: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The slots a checkpoint of `layout` fills: the params, and for "nvlabs" the null caption embedding."""
    expected = flatten(abstract_params(config))
    if layout == "nvlabs":
        expected[NULL_CAPTION_PATH] = jax.ShapeDtypeStruct((RELEASED_TEXT_TOKENS, config.caption_channels), np.float32)
    return expected


def detect_layout(keys) -> str:
    """"nvlabs" when any NVlabs-only name is present, else "diffusers"."""
    nvlabs_only = {"t_embedder.mlp.0.weight", POS_EMBED_KEY, NULL_CAPTION_KEY}
    return "nvlabs" if nvlabs_only & set(keys) else "diffusers"


def is_known_unused(key: str, layout: str) -> bool:
    return any(re.search(pattern, key) for pattern in KNOWN_UNUSED[layout])


def released_tensor_shapes(config: SanaWMConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{layout: {name: PyTorch shape}}: every tensor a released checkpoint of each layout holds for a model of
    `config`: what the key map reads, plus the buffers the model does not use."""
    tables = {}
    for layout in LAYOUTS:
        shapes = {torch_key(path, layout): torch_shape(struct.shape, path[-1])
                  for path, struct in expected_tensors(config, layout).items()}
        shapes.update({f"blocks.{index}.attn.recall_gate": (1,) for index in range(config.num_layers)})
        if layout == "nvlabs":
            shapes[POS_EMBED_KEY] = (1, RELEASED_POS_EMBED_GRID**2, config.hidden_size)
        tables[layout] = shapes
    return tables


def released_table(layout: str) -> dict[str, tuple[int, ...]]:
    """The stored name -> shape table of the released 2.6B checkpoint of `layout` (see `released_keys/`)."""
    table = json.loads((RELEASED_KEYS_DIR / f"{layout}.json").read_text())
    return {name: tuple(shape) for name, shape in table["tensors"].items()}


class DiTKind(NamedTuple):
    """What a released DiT checkpoint says about its kind: `mode` (one of `config.MODES`, None when nothing says),
    the `evidence` for it, and the config fields it fixes (`config.mode_fields`)."""

    mode: str | None
    evidence: str | None = None
    fields: dict | None = None


def _kind_of_config(fields: dict, evidence: str) -> DiTKind:
    mode = mode_of(fields)
    return DiTKind(mode, evidence, mode_fields(fields)) if mode else DiTKind(None)


def _nvlabs_config_fields(path: Path) -> dict:
    """The `model:` section of the NVlabs config.yaml shipped beside a flat DiT file (`config.yaml` next to it or one
    folder up, as in `<repo>/dit/<file>.safetensors`), or {} when there is none."""
    import yaml

    for candidate in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            try:
                config = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as e:
                raise ValueError(f"{candidate}: not valid YAML ({e})") from e
            model = config.get("model") if isinstance(config, dict) else None
            return model if isinstance(model, dict) else {}
    return {}


def detect_dit_kind(source) -> DiTKind:
    """The kind of DiT a `TensorSource` holds. The three released DiTs have the same tensors (NVlabs' chunk-causal
    and streaming modules keep the bidirectional names), so the kind comes from around them: a torch pickle with a
    "generator" state dict (the streaming release's model.pt), the config (diffusers config.json, or the NVlabs
    config.yaml beside a flat file), else the released file name (`sana_wm_chunk_causal_1600m_720p.safetensors`).

    Raises a one-line ValueError naming what `source` is when it is a released checkpoint of another kind than a
    DiT (refiner, text connectors, VAE; a pickle without a generator is refused by `torch_sources`).
    """
    where = source.path if source.path is not None else source.description
    config = source.config or {}
    class_name = config.get("_class_name", DIFFUSERS_CLASS)
    if class_name in OTHER_DIFFUSERS_CLASSES:
        what, advice = OTHER_DIFFUSERS_CLASSES[class_name]
        raise ValueError(f"{where} is {what} ({class_name} in config.json); {advice}")
    if class_name != DIFFUSERS_CLASS:
        raise ValueError(f"{where} is a diffusers {class_name} folder, not the SANA-WM DiT ({DIFFUSERS_CLASS})")
    if GENERATOR_KEY in source.top_level:
        return DiTKind("streaming", f"its {GENERATOR_KEY!r} state dict, the distillation trainer's save")
    kind = _kind_of_config(config, "config.json")
    if kind.mode is None and source.config is None and source.path is not None and source.path.is_file():
        kind = _kind_of_config(_nvlabs_config_fields(source.path), "its config.yaml")
        name = source.path.name
        if kind.mode is None and ("chunk_causal" in name or "streaming" in name):
            kind = DiTKind("chunk_causal" if "chunk_causal" in name else "streaming", "file name")
    return kind


def resolve_mode(source, requested: str | None) -> DiTKind:
    """The kind to convert `source` as: what it says, else `requested`, else "bidirectional". A `requested` mode
    that contradicts what the checkpoint says raises a one-line ValueError."""
    kind = detect_dit_kind(source)
    if kind.mode is None:
        return DiTKind(requested or "bidirectional", "--mode" if requested else "default: nothing says otherwise")
    if requested is not None and requested != kind.mode:
        where = source.path if source.path is not None else source.description
        raise ValueError(f"{where} is a SANA-WM {kind.mode} DiT checkpoint (by {kind.evidence}); it cannot be "
                         f"converted as mode={requested}")
    return kind


def convert_transformer(source, config: SanaWMConfig, log=print) -> tuple[dict, np.ndarray | None]:
    """Convert a `TensorSource` (see `torch_sources.open_torch_checkpoint`) in either released layout, reading one
    tensor at a time -> (params tree of numpy arrays in `config.param_dtype`, the null caption embedding
    (tokens, caption_channels) float32 of an NVlabs-layout source, else None)."""
    layout = detect_layout(source.keys())
    params = convert_tensors(source, expected_tensors(config, layout), lambda path: torch_key(path, layout),
                             "the model config", lambda key: is_known_unused(key, layout), log)
    return params, params.pop(NULL_CAPTION_PATH[0], None)


def convert_state_dict(source, config: SanaWMConfig, log=print) -> dict:
    """The params of `convert_transformer`."""
    return convert_transformer(source, config, log)[0]


def save_transformer(out_dir, params, config: SanaWMConfig, null_caption: np.ndarray | None = None) -> Path:
    """Write params and config, and the null caption embedding beside them when given."""
    out_dir = store.save_params(out_dir, params, config.to_dict())
    if null_caption is not None:
        np.save(out_dir / NULL_CAPTION_FILE, null_caption)
    return out_dir


def load_null_caption_embedding(ckpt_dir) -> np.ndarray | None:
    """The null caption embedding (tokens, caption_channels) float32 saved by `convert_torch_weights.py` from an
    NVlabs checkpoint, for text dropout in training; None when the checkpoint was converted without one."""
    path = store.component_dir(ckpt_dir, TRANSFORMER_DIR) / NULL_CAPTION_FILE
    return np.load(path) if path.is_file() else None


def checkpoint_mode(ckpt_dir) -> str:
    """The mode ("bidirectional", "chunk_causal" or "streaming") of the DiT in a checkpoint written by
    `convert_torch_weights.py`: the kind of released weights it was converted from (the default for `--mode`)."""
    return SanaWMConfig.from_dict(store.read_config(store.component_dir(ckpt_dir, TRANSFORMER_DIR))).mode


def load_transformer(ckpt_dir, sharding=None, **config_overrides) -> tuple[SanaWMTransformer, dict]:
    """Restore `(model, params)` from a checkpoint written by `convert_torch_weights.py` (its `transformer/`, or a
    transformer-only directory).

    config_overrides replace config fields (e.g. `param_dtype="bfloat16"` casts on restore, `dtype`, `gdn_impl`,
    `attention_impl`, `remat`); `sharding` as in `store.restore_params`. Saved shapes that differ from the config's
    raise a one-line ValueError naming the first mismatching parameter; so does a `mode` other than the saved one
    (weights of one kind are not a model of another: see `checkpoint_mode`).
    """
    model_dir = store.component_dir(ckpt_dir, TRANSFORMER_DIR)
    saved = SanaWMConfig.from_dict(store.read_config(model_dir))
    config = saved.replace(**config_overrides)
    if config.mode != saved.mode:
        raise ValueError(f"{model_dir} holds a {saved.mode} DiT (converted from a {saved.mode} checkpoint); it cannot "
                         f"be loaded with mode={config.mode}: use --mode {saved.mode} or a {config.mode} checkpoint")
    return SanaWMTransformer(config), store.restore_params(model_dir, abstract_params(config), sharding)
