"""diffusers refiner folders -> our parameter trees, one tensor at a time.

Transformer (`SanaWMLTX2RefinerTransformer3DModel`, folder `refiner/transformer/` or `refiner_diffusers/transformer/`):
our paths map to the diffusers names by `torch_name` (`transformer_blocks_3/attn1/to_out_0/kernel` ->
`transformer_blocks.3.attn1.to_out.0.weight`). The audio stream's tensors (`audio_*`, `av_cross_attn_*`, the blocks'
`audio_*`, `audio_to_video_*`, `video_to_audio_*` and a2v tables) are skipped and listed in one log line.
Connectors (`LTX2TextConnectors`, folder `connectors/`): `text_proj_in` and the video connector convert; the audio
connector is skipped the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp

from sanawm_jax.checkpoint.keymap import convert_tensor_groups, flatten, torch_name, torch_shape, unflatten
from sanawm_jax.checkpoint.torch_sources import open_diffusers_folder
from sanawm_jax.models.refiner.config import ConnectorsConfig, RefinerConfig
from sanawm_jax.models.refiner.connectors import TextConnectors
from sanawm_jax.models.refiner.rope import rope_tables, video_fractions
from sanawm_jax.models.refiner.transformer import RefinerTransformer

NUMBERED = "transformer_blocks|to_out|net"
AUDIO_KEY = re.compile(r"(^|\.)(audio_|av_cross_attn_|video_to_audio_|video_a2v_)|^audio_connector\.")


def is_audio_key(key: str) -> bool:
    """True for the tensors of the audio stream, which the video refiner never reads."""
    return bool(AUDIO_KEY.search(key))


def diffusers_key(path: tuple[str, ...]) -> str:
    return torch_name(path, numbered=NUMBERED)


def abstract_refiner_params(config: RefinerConfig) -> dict:
    """Parameter tree of `RefinerTransformer(config)` as ShapeDtypeStructs (nothing allocated)."""
    rope = rope_tables(video_fractions([0], 1, 1, scale_factors=config.vae_scale_factors,
                                       causal_offset=config.causal_offset, fps=24.0,
                                       max_positions=(config.pos_embed_max_pos, config.base_height,
                                                      config.base_width)),
                       config.inner_dim, config.rope_theta, config.rope_type, config.num_attention_heads)
    tokens = jax.ShapeDtypeStruct((1, 1, config.in_channels), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 1, config.caption_channels), jnp.float32)
    steps = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    variables = jax.eval_shape(lambda *a: RefinerTransformer(config).init(jax.random.key(0), *a),
                               tokens, text, steps, rope)
    return variables["params"]


def abstract_connector_params(config: ConnectorsConfig) -> dict:
    """Parameter tree of `TextConnectors(config)` as ShapeDtypeStructs (nothing allocated)."""
    length = config.video_connector_num_learnable_registers or 1
    states = jax.ShapeDtypeStruct((1, length, config.caption_channels * config.text_proj_in_factor), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(lambda *a: TextConnectors(config).init(jax.random.key(0), *a), states, mask)["params"]


ABSTRACT_PARAMS = {RefinerConfig: abstract_refiner_params, ConnectorsConfig: abstract_connector_params}


def abstract_params(config: RefinerConfig | ConnectorsConfig) -> dict:
    """Parameter tree of the model `config` configures (`RefinerTransformer` or `TextConnectors`), abstract."""
    return ABSTRACT_PARAMS[type(config)](config)


def key_table(config: RefinerConfig | ConnectorsConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers key: diffusers shape} of every tensor the model of `config` reads."""
    return {diffusers_key(path): torch_shape(leaf.shape, path[-1])
            for path, leaf in flatten(abstract_params(config)).items()}


def convert_groups(source, config: RefinerConfig | ConnectorsConfig, log=print):
    """A `TensorSource` of the diffusers refiner transformer or connectors -> one flat {path: numpy array} per source
    shard, after a strict check of every key and shape from the headers (audio tensors skipped in one log line)."""
    return convert_tensor_groups(source, flatten(abstract_params(config)), diffusers_key,
                                 f"the {type(config).__name__}", is_audio_key, log)


def convert(source, config: RefinerConfig | ConnectorsConfig, log=print) -> dict:
    """`convert_groups` gathered into one params tree of numpy arrays."""
    return unflatten({path: array for group in convert_groups(source, config, log) for path, array in group.items()})


def open_folder(folder, config_class: type[RefinerConfig] | type[ConnectorsConfig], *, param_dtype: str = "float32",
                dtype: str = "float32"):
    """A diffusers refiner transformer or `LTX2TextConnectors` folder -> (lazy TensorSource, its config)."""
    source = open_diffusers_folder(Path(folder))
    return source, config_class.from_diffusers_config(source.config, param_dtype=param_dtype, dtype=dtype)
