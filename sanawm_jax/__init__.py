"""sanawm-jax: the SANA-WM camera-controlled video world model in JAX/Flax."""

from sanawm_jax.checkpoint.store import load_transformer, save_transformer
from sanawm_jax.config import PRESETS, SanaWMConfig, get_config
from sanawm_jax.transformer import SanaWMTransformer, abstract_params, init_params

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
