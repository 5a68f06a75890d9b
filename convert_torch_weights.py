"""Convert released PyTorch SANA-WM weights into a sanawm-jax checkpoint directory.

    python convert_torch_weights.py SRC OUT_DIR [--config PRESET|config.json] [--mode MODE] [--vae DIR]
                                                [--text-encoder DIR] [--tokenizer DIR] [--refiner DIR] [--debug]

SRC is a SANA-WM DiT of any of the three released kinds: a diffusers pipeline root (its transformer/, vae/,
text_encoder/ and tokenizer/ are all converted), a diffusers transformer folder, an NVlabs release folder
(SANA-WM_bidirectional or SANA-WM_chunk_causal: dit/*.safetensors, config.yaml and vae/; SANA-WM_streaming:
sana_dit/model.pt and ltx2_causal_vae/) or its DiT file alone, or a torch pickle ({"generator"|"state_dict"|"model":
state_dict}, optional "model." prefix; of the streaming model.pt only the generator is converted). The kind (the
converted config's mode: bidirectional, chunk_causal, streaming) is read from the files: a "generator" pickle is the
streaming student, a config.json/config.yaml or the file name tells the chunk-causal teacher; --mode names it when they
do not, and a --mode they contradict is refused. Refiner and VAE folders given as SRC are refused by name.
--vae takes a diffusers AutoencoderKLLTX2Video folder or the causal ltx2_causal_vae/, --text-encoder a Hugging Face
Gemma-2 folder (tokenizer files in it or in --tokenizer). OUT_DIR gets transformer/ (with the null caption embedding
of an NVlabs file), vae/ and text_encoder/; it is written only when every component converted.
--refiner takes a released stage-2 refiner (SANA-WM_bidirectional/ with refiner/{transformer,connectors,text_encoder}/
or SANA-WM_streaming/ with refiner_diffusers/{transformer,connectors}/ + gemma3_12b/, or the refiner folder itself);
it is converted shard by shard in bfloat16 into OUT_DIR/refiner/. Bad input is one `error:` line and exit code 2.
"""

from sanawm_jax import cli
from sanawm_jax.models.sana_wm.config import MODES, get_config
from sanawm_jax.pipeline import convert_pipeline


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="DiT source (pipeline root, transformer folder, .safetensors, .pt/.pth/.bin)")
    parser.add_argument("out_dir", help="output checkpoint directory (must not exist, or be empty)")
    parser.add_argument("--config", help="DiT preset name or JSON config (required when SRC has no config.json)")
    parser.add_argument("--mode", choices=MODES,
                        help="the DiT's kind when SRC does not tell it (default: read from SRC, else bidirectional)")
    parser.add_argument("--vae", help="diffusers LTX-2 VAE folder (or the streaming release's ltx2_causal_vae)")
    parser.add_argument("--text-encoder", help="Hugging Face Gemma-2 folder")
    parser.add_argument("--tokenizer", help="folder with the Gemma tokenizer files (default: the text encoder's)")
    parser.add_argument("--refiner", help="released stage-2 refiner (release root or its refiner folder)")
    args = parser.parse_args(argv)
    config = get_config(args.config) if args.config else None
    return convert_pipeline(args.src, args.out_dir, config, mode=args.mode, vae=args.vae,
                            text_encoder=args.text_encoder, tokenizer=args.tokenizer, refiner=args.refiner)


if __name__ == "__main__":
    cli.run(main)
