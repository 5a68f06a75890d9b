"""diffusers `AutoencoderKLLTX2Video` weights (a `vae/` folder) -> our VAE parameter tree, by a fixed rule.

Naming: the Flax path is the diffusers key split at dots, with every numeric component joined to the one before it
(`down_blocks.0.resnets.3` -> `down_blocks_0/resnets_3`), and `weight` -> `kernel` (convolutions) or `scale`
(LayerNorm). `latents_mean` / `latents_std` are checkpoint buffers and become top-level parameters.
Layout: Conv3d (out, in, kt, kh, kw) -> (kt, kh, kw, in, out). Conversion is strict (see `checkpoint.keymap`).
BF16 tensors on disk are widened exactly to float32, then cast to `config.param_dtype`.
"""

from __future__ import annotations

from pathlib import Path

from sanawm_jax.checkpoint.keymap import convert_tensors, flatten, torch_name
from sanawm_jax.checkpoint.torch_sources import TensorSource, open_torch_checkpoint
from sanawm_jax.models.ltx2_vae.config import VAEConfig
from sanawm_jax.models.ltx2_vae.model import abstract_vae_params

DIFFUSERS_CLASS = "AutoencoderKLLTX2Video"
# NVlabs/Sana's causal LTX-2 VAE (the streaming release's `ltx2_causal_vae/`): the same modules and tensor names, a
# causal decoder by default, and the decoder's upsampler kinds under `decoder_upsample_type`.
CAUSAL_CLASS = "AutoencoderKLCausalLTX2Video"


def torch_key(path: tuple[str, ...]) -> str:
    """("decoder", "up_blocks_1", "conv_in", "norm3", "scale") -> "decoder.up_blocks.1.conv_in.norm3.weight"."""
    return torch_name(path)


def convert_vae_state_dict(source: TensorSource, config: VAEConfig) -> dict:
    """Convert a `TensorSource` into a params tree of numpy arrays, reading one tensor at a time."""
    expected = flatten(abstract_vae_params(config))
    return convert_tensors(source, expected, torch_key, "the VAE config")


def convert_vae(src: str | Path, **policy) -> tuple[VAEConfig, dict]:
    """Read a diffusers VAE folder (`AutoencoderKLLTX2Video`, or NVlabs' `AutoencoderKLCausalLTX2Video` such as the
    streaming release's `ltx2_causal_vae/`), or a pipeline root holding one in `vae/`, into (VAEConfig, params).

    `policy` overrides numerics fields of the config, e.g. `dtype="bfloat16"`.
    """
    src = Path(src)
    subfolder = None if (src / "config.json").is_file() else "vae"
    source = open_torch_checkpoint(src, subfolder=subfolder)
    if source.config is None:
        raise ValueError(f"{source.description}: a diffusers VAE folder with config.json is required")
    class_name = source.config.get("_class_name", DIFFUSERS_CLASS)
    if class_name not in (DIFFUSERS_CLASS, CAUSAL_CLASS):
        raise ValueError(f"{source.description}: config.json describes a {class_name}, not a {DIFFUSERS_CLASS} "
                         f"or {CAUSAL_CLASS}")
    fields = dict(source.config)
    upsample_type = fields.pop("decoder_upsample_type", None)
    if upsample_type is not None:
        fields["upsample_type"] = upsample_type
    config = VAEConfig.from_diffusers_config(fields).replace(**policy)
    return config, convert_vae_state_dict(source, config)
