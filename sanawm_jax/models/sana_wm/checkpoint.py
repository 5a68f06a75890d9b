"""SANA-WM DiT checkpoints: the PyTorch key map, and saving/loading the DiT in our format.

Naming: the Flax tree mirrors the diffusers module path, with `blocks.N` -> `blocks_N`, three wrapper modules folded
away (`t_block.1`, `y_embedder.y_proj`, the `.conv` inside FFN conv layers), and `weight` -> `kernel` (Linear, Conv)
or `scale` (1-D norm weights). Layouts follow `sanawm_jax.checkpoint.keymap`.
"""

from __future__ import annotations

import re

from sanawm_jax.checkpoint import store
from sanawm_jax.checkpoint.keymap import convert_tensors, flatten
from sanawm_jax.models.sana_wm.config import SanaWMConfig
from sanawm_jax.models.sana_wm.transformer import SanaWMTransformer, abstract_params

TRANSFORMER_DIR = "transformer"

# (torch pattern, flax replacement), applied in order to the dotted key.
RENAMES = (
    (r"^t_block\.1\.", "t_block."),
    (r"^y_embedder\.y_proj\.", "y_embedder."),
    (r"\.(inverted_conv|depth_conv|point_conv)\.conv\.", r".\1."),
    (r"^blocks\.(\d+)\.", r"blocks_\1."),
)
INVERSE_RENAMES = (
    (r"^t_block\.", "t_block.1."),
    (r"^y_embedder\.", "y_embedder.y_proj."),
    (r"\.(inverted_conv|depth_conv|point_conv)\.", r".\1.conv."),
    (r"^blocks_(\d+)\.", r"blocks.\1."),
)
# Present in released checkpoints, unused by the model: the NVlabs absolute position table and a GDN buffer.
KNOWN_UNUSED = (r"^pos_embed$", r"\.recall_gate$")


def is_known_unused(torch_key: str) -> bool:
    return any(re.search(pattern, torch_key) for pattern in KNOWN_UNUSED)


def flax_path(torch_key: str, ndim: int) -> tuple[str, ...]:
    """`blocks.3.attn.qkv.weight` (2-D) -> ("blocks_3", "attn", "qkv", "kernel")."""
    name = torch_key
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    *parents, leaf = name.split(".")
    if leaf == "weight":
        leaf = "kernel" if ndim >= 2 else "scale"
    return (*parents, leaf)


def torch_key(path: tuple[str, ...]) -> str:
    """Inverse of `flax_path`: the source key a parameter is read from."""
    *parents, leaf = path
    name = ".".join([*parents, "weight" if leaf in ("kernel", "scale") else leaf])
    for pattern, replacement in INVERSE_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def convert_state_dict(source, config: SanaWMConfig, log=print) -> dict:
    """Convert a `TensorSource` (see `torch_sources.open_torch_checkpoint`) into a params tree of numpy arrays in
    `config.param_dtype`, reading one tensor at a time."""
    expected = flatten(abstract_params(config))
    return convert_tensors(source, expected, flax_path, torch_key, "the model config", is_known_unused, log)


def save_transformer(out_dir, params, config: SanaWMConfig):
    return store.save_params(out_dir, params, config.to_dict())


def load_transformer(ckpt_dir, sharding=None, **config_overrides) -> tuple[SanaWMTransformer, dict]:
    """Restore `(model, params)` from a checkpoint written by `convert_torch_weights.py` (its `transformer/`, or a
    transformer-only directory).

    config_overrides replace config fields (e.g. `param_dtype="bfloat16"` casts on restore, `dtype`, `gdn_impl`,
    `attention_impl`, `remat`); `sharding` as in `store.restore_params`.
    """
    model_dir = store.component_dir(ckpt_dir, TRANSFORMER_DIR)
    config = SanaWMConfig.from_dict(store.read_config(model_dir)).replace(**config_overrides)
    return SanaWMTransformer(config), store.restore_params(model_dir, abstract_params(config), sharding)
