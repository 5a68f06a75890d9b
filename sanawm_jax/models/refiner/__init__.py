"""The stage-2 refiner: the LTX-2 video transformer (video path), its text connectors, their converters."""

from sanawm_jax.models.refiner.config import (
    CONNECTOR_PRESETS,
    REFINER_PRESETS,
    ConnectorsConfig,
    RefinerConfig,
)
from sanawm_jax.models.refiner.connectors import TextConnectors, normalize_text_states
from sanawm_jax.models.refiner.transformer import KVPrefix, RefinerTransformer

__all__ = ["CONNECTOR_PRESETS", "REFINER_PRESETS", "ConnectorsConfig", "KVPrefix", "RefinerConfig",
           "RefinerTransformer", "TextConnectors", "normalize_text_states"]
