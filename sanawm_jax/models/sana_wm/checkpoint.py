"""SANA-WM DiT checkpoints: the key maps of the released layouts, refusal of released checkpoints of other kinds, and
saving/loading the DiT in our format.

Released layouts of the bidirectional DiT (every tensor's name and shape for the 2.6B model: `released_keys/`):
  * "diffusers": the state dict of diffusers' `SanaWMTransformer3DModel` (a `transformer/` folder).
  * "nvlabs": NVlabs/Sana's flat `dit/sana_wm_1600m_720p.safetensors`: the same names, except that the timestep MLP
    is `t_embedder.mlp.0/2` (diffusers: `t_embedder.linear_1/2`), plus the sin-cos table `pos_embed` and the null
    caption embedding `y_embedder.y_embedding` (what training's text dropout substitutes for the caption).
Both hold the GDN buffer `blocks.N.attn.recall_gate`. The model uses neither `pos_embed` nor `recall_gate` (they are
listed, not converted); the null caption embedding is kept beside the params (`load_null_caption_embedding`).

Naming: the Flax tree mirrors the diffusers module path, with `blocks.N` -> `blocks_N`, three wrapper modules folded
away (`t_block.1`, `y_embedder.y_proj`, the `.conv` inside FFN conv layers), and `weight` -> `kernel` (Linear, Conv)
or `scale` (1-D norm weights). Layouts and the strict checks follow `sanawm_jax.checkpoint.keymap`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np

from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.keymap import convert_tensors, flatten, torch_name, torch_shape
from sanawm_jax.models.sana_wm.config import SanaWMConfig
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
NOT_SUPPORTED = "converting it is not supported yet"
OTHER_DIFFUSERS_CLASSES = {  # _class_name: (what it is, what to do)
    "SanaWMLTX2RefinerTransformer3DModel": ("a SANA-WM stage-2 refiner transformer folder", NOT_SUPPORTED),
    "LTX2TextConnectors": ("a SANA-WM refiner text-connector folder", NOT_SUPPORTED),
    "AutoencoderKLLTX2Video": ("an LTX-2 video VAE folder", "give it as the VAE (--vae), not as the DiT"),
}
STREAMING_PICKLE_KEYS = ("critic", "denoising_step_list")


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


def _variant(fields: dict) -> str | None:
    """"streaming" or "chunk-causal" when a config (diffusers config.json or the `model:` section of an NVlabs
    config.yaml) describes that variant of the DiT, else None."""
    text = " ".join(str(fields.get(name, "")) for name in ("model", "attn_type", "camctrl_type", "ffn_type"))
    if "Streaming" in text or "Cached" in text or fields.get("pos_embed_type") == "casual_wan_rope":
        return "streaming"
    if "ChunkCausal" in text or fields.get("chunk_size") is not None:
        return "chunk-causal"
    return None


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


def check_bidirectional_dit(source) -> None:
    """Raise a one-line ValueError naming what `source` is when it is a released checkpoint of another kind than the
    bidirectional DiT: another diffusers class (refiner, text connectors, VAE), a streaming `model.pt`, or a
    chunk-causal / streaming DiT (known by its config.json, the NVlabs config.yaml beside it, or its file name)."""
    where = source.path if source.path is not None else source.description
    config = source.config or {}
    class_name = config.get("_class_name", DIFFUSERS_CLASS)
    if class_name in OTHER_DIFFUSERS_CLASSES:
        what, advice = OTHER_DIFFUSERS_CLASSES[class_name]
        raise ValueError(f"{where} is {what} ({class_name} in config.json); {advice}")
    if class_name != DIFFUSERS_CLASS:
        raise ValueError(f"{where} is a diffusers {class_name} folder, not the SANA-WM DiT ({DIFFUSERS_CLASS})")
    if set(STREAMING_PICKLE_KEYS) & set(source.top_level):
        raise ValueError(f"{where} is a SANA-WM streaming checkpoint (model.pt with generator/critic); {NOT_SUPPORTED}")
    variant, evidence = _variant(config), "config.json"
    if variant is None and source.config is None and source.path is not None and source.path.is_file():
        variant, evidence = _variant(_nvlabs_config_fields(source.path)), "its config.yaml"
        name = source.path.name
        if variant is None and ("chunk_causal" in name or "streaming" in name):
            variant, evidence = ("chunk-causal" if "chunk_causal" in name else "streaming"), "file name"
    if variant is not None:
        raise ValueError(f"{where} is a SANA-WM {variant} DiT checkpoint (by {evidence}); {NOT_SUPPORTED}")


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


def load_transformer(ckpt_dir, sharding=None, **config_overrides) -> tuple[SanaWMTransformer, dict]:
    """Restore `(model, params)` from a checkpoint written by `convert_torch_weights.py` (its `transformer/`, or a
    transformer-only directory).

    config_overrides replace config fields (e.g. `param_dtype="bfloat16"` casts on restore, `dtype`, `gdn_impl`,
    `attention_impl`, `remat`); `sharding` as in `store.restore_params`. Saved shapes that differ from the config's
    raise a one-line ValueError naming the first mismatching parameter.
    """
    model_dir = store.component_dir(ckpt_dir, TRANSFORMER_DIR)
    config = SanaWMConfig.from_dict(store.read_config(model_dir)).replace(**config_overrides)
    return SanaWMTransformer(config), store.restore_params(model_dir, abstract_params(config), sharding)
