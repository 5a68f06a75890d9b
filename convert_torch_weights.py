"""Convert a released PyTorch SANA-WM transformer checkpoint into a sanawm-jax checkpoint directory.

    python convert_torch_weights.py SRC OUT_DIR [--config PRESET|config.json]

SRC: a diffusers transformer folder (or pipeline root with transformer/), an NVlabs flat .safetensors, or a torch
pickle ({"generator"|"state_dict"|"model": state_dict}, optional "model." prefix).
"""

import argparse

from sanawm_jax.checkpoint.convert import convert_checkpoint
from sanawm_jax.config import get_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint (folder, .safetensors, .pt/.pth/.bin)")
    parser.add_argument("out_dir", help="output directory (config.json + orbax params/)")
    parser.add_argument("--config", help="preset name or JSON config (required for files without config.json)")
    args = parser.parse_args(argv)
    config = get_config(args.config) if args.config else None
    convert_checkpoint(args.src, args.out_dir, config)


if __name__ == "__main__":
    main()
