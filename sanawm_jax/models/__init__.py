"""Model families: the SANA-WM DiT (`sana_wm`), the LTX-2 video VAE (`ltx2_vae`) and the Gemma text encoder
(`gemma`). Each package owns its config, modules and checkpoint key map."""
