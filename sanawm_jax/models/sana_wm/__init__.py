"""The SANA-WM DiT: config, Flax modules and checkpoint key map."""

from sanawm_jax.models.sana_wm.checkpoint import (
    checkpoint_mode,
    convert_state_dict,
    load_transformer,
    save_transformer,
)
from sanawm_jax.models.sana_wm.config import PRESETS, SanaWMConfig, get_config
from sanawm_jax.models.sana_wm.transformer import (
    SanaWMTransformer,
    abstract_params,
    init_params,
)

__all__ = [
    "PRESETS",
    "SanaWMConfig",
    "SanaWMTransformer",
    "abstract_params",
    "checkpoint_mode",
    "convert_state_dict",
    "get_config",
    "init_params",
    "load_transformer",
    "save_transformer",
]
