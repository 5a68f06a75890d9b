"""sanawm-jax: the SANA-WM camera-controlled video world model in JAX/Flax."""

from sanawm_jax.models.sana_wm import (
    PRESETS,
    SanaWMConfig,
    SanaWMTransformer,
    abstract_params,
    get_config,
    init_params,
    load_transformer,
    save_transformer,
)

__all__ = [
    "PRESETS",
    "SanaWMConfig",
    "SanaWMTransformer",
    "abstract_params",
    "get_config",
    "init_params",
    "load_transformer",
    "save_transformer",
]
