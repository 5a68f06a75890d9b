"""Prompt -> Gemma-2 text conditioning for the DiT, exactly as the SANA-WM pipeline builds it, and precomputed `.npz`
embeddings.

Positive prompts: the "chi" instruction lines joined by newlines, followed directly by the prompt, are tokenised with
BOS, right-padded and truncated to `len(tokenize(chi)) + L - 2` tokens (L = 300), run through Gemma-2, and the states
and mask of the BOS token plus the last L - 1 positions are kept. Negative prompts are encoded without the prefix at
L tokens. Embeddings are the last hidden states after Gemma-2's final norm.

`.npz` files hold `prompt_embeds` (B, L, D) (the pipeline's (B, 1, L, D) is accepted), `prompt_attention_mask` (B, L),
and optionally `negative_prompt_embeds` / `negative_prompt_attention_mask` with the same L and D.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sanawm_jax.models.gemma.checkpoint import load_gemma2
from sanawm_jax.models.gemma.gemma2 import Gemma2Model

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 300
CAPTION_CHANNELS = 2304
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json")  # the files a converted checkpoint keeps
# The instruction prefix SANA-WM was trained with (the SANA "Enhanced prompt" prompt).
DEFAULT_CHI_PROMPT: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def load_tokenizer(folder: str | Path):
    """The Hugging Face fast tokenizer saved in `folder` (tokenizer.json or tokenizer.model), read without network."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], length: int, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (input_ids (B, length) int32, attention_mask (B, length) int32), with BOS, right padding and
    truncation to `length`. A text that does not fit logs a warning naming the dropped tail and the encoder's
    `window` of tokens (default: `length`)."""
    texts = list(texts)
    for ids in tokenizer(texts)["input_ids"]:
        if len(ids) > length:
            logger.warning(
                f"The following part of the prompt was truncated to fit the text encoder's {window or length}-token "
                f"window: {tokenizer.decode(ids[length:])!r}"
            )
    tokens = tokenizer(
        texts, max_length=length, padding="max_length", padding_side="right", truncation=True, return_tensors="np",
    )
    return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)


def selection_index(total_length: int, kept_length: int) -> np.ndarray:
    """Positions kept from a prefixed sequence: 0 (BOS) then the last kept_length - 1 positions."""
    first = total_length - kept_length + 1
    if first < 0:
        raise ValueError(f"cannot keep {kept_length} positions of a {total_length}-token sequence")
    return np.concatenate([[0], np.arange(first, total_length)]).astype(np.int32)


@functools.cache
def forward_program(config):
    """The jitted (params, ids (B, L), mask (B, L)) -> last hidden states (B, L, D) of Gemma-2 `config`; one per
    config, shared by every TextEncoder of it."""
    model = Gemma2Model(config)
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


class TextEncoder:
    """Gemma-2 prompt encoder: prompts -> (embeddings (B, L, D) in the compute dtype, mask (B, L) int32).

    `chi_prompt` lines are joined by newlines and prefixed to positive prompts; an empty tuple disables the prefix.
    """

    def __init__(
        self,
        tokenizer,
        config,
        params,
        *,
        chi_prompt: Sequence[str] = DEFAULT_CHI_PROMPT,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.tokenizer = tokenizer
        self.config = config
        self.params = jax.device_put(params)
        self.chi = "\n".join(chi_prompt)
        self.max_sequence_length = max_sequence_length
        self._forward = forward_program(config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        tokenizer_folder: str | Path | None = None,
        param_dtype: str = "float32",
        dtype: str = "float32",
        **kwargs,
    ) -> "TextEncoder":
        """Load from a Hugging Face Gemma-2 folder (weights + tokenizer), or from a diffusers pipeline root with
        `text_encoder/` and `tokenizer/` subfolders. `tokenizer_folder` overrides where the tokenizer is read."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() and (folder / "text_encoder").is_dir():
            tokenizer_folder = tokenizer_folder or folder / "tokenizer"
            folder = folder / "text_encoder"
        tokenizer = load_tokenizer(tokenizer_folder or folder)
        config, params = load_gemma2(folder, param_dtype=param_dtype, dtype=dtype)
        return cls(tokenizer, config, params, **kwargs)

    def hidden_states(self, texts: Sequence[str], length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """texts tokenised to `length` -> (last hidden states (B, length, D), attention mask (B, length))."""
        ids, mask = tokenize(self.tokenizer, texts, length, window=self.max_sequence_length)
        return self._forward(self.params, jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)

    def encode(self, prompts: str | Sequence[str]) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Positive prompts, chi-prefixed: BOS + the last L - 1 positions -> ((B, L, D), (B, L))."""
        prompts = as_prompt_list(prompts)
        length = self.max_sequence_length
        if self.chi:
            length = len(self.tokenizer.encode(self.chi)) + self.max_sequence_length - 2
        states, mask = self.hidden_states([self.chi + prompt for prompt in prompts], length)
        index = selection_index(length, self.max_sequence_length)
        return states[:, index], mask[:, index]

    def encode_negative(self, prompts: str | Sequence[str] = "") -> tuple[jnp.ndarray, jnp.ndarray]:
        """Negative prompts, without the chi prefix -> ((B, L, D), (B, L))."""
        return self.hidden_states(as_prompt_list(prompts), self.max_sequence_length)


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be a string or a non-empty sequence of strings, got {prompts!r}")
    return prompts


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    """Text conditioning for sampling: prompt_embeds (B, L, D), prompt_attention_mask (B, L), and optionally the
    negative pair with the same L and D and a batch of 1 or B."""

    prompt_embeds: np.ndarray
    prompt_attention_mask: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    negative_prompt_attention_mask: np.ndarray | None = None


NPZ_KEYS = tuple(field.name for field in dataclasses.fields(PromptEmbeddings))


def load_embeddings_npz(
    path: str | Path,
    *,
    caption_channels: int | None = CAPTION_CHANNELS,
    max_sequence_length: int | None = MAX_SEQUENCE_LENGTH,
) -> PromptEmbeddings:
    """Read precomputed embeddings (keys in NPZ_KEYS) and validate their shapes; None skips the L or D check."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embeddings file")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    unknown = sorted(set(arrays) - set(NPZ_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected {list(NPZ_KEYS)}")
    for key in NPZ_KEYS[:2]:
        if key not in arrays:
            raise ValueError(f"{path}: missing key {key!r}")
    if ("negative_prompt_embeds" in arrays) != ("negative_prompt_attention_mask" in arrays):
        raise ValueError(f"{path}: negative_prompt_embeds and negative_prompt_attention_mask must come together")
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if key in arrays and arrays[key].ndim == 4 and arrays[key].shape[1] == 1:
            arrays[key] = arrays[key][:, 0]
    embeds = arrays["prompt_embeds"]
    if embeds.ndim != 3 or not np.issubdtype(embeds.dtype, np.floating):
        raise ValueError(
            f"{path}: prompt_embeds must be float (B, L, D) or (B, 1, L, D), got {embeds.dtype} {embeds.shape}"
        )
    batch, length, channels = embeds.shape
    if max_sequence_length is not None and length != max_sequence_length:
        raise ValueError(f"{path}: prompt_embeds has {length} tokens, expected {max_sequence_length}")
    if caption_channels is not None and channels != caption_channels:
        raise ValueError(f"{path}: prompt_embeds has {channels} channels, expected {caption_channels}")
    expected = {"prompt_attention_mask": (batch, length)}
    negative = arrays.get("negative_prompt_embeds")
    if negative is not None:
        if negative.ndim != 3 or negative.shape[0] not in (1, batch) or negative.shape[1:] != (length, channels):
            expected_shape = f"(1 or {batch}, {length}, {channels})"
            raise ValueError(f"{path}: negative_prompt_embeds has shape {negative.shape}, expected {expected_shape}")
        expected["negative_prompt_attention_mask"] = negative.shape[:2]
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {arrays[key].shape}, expected {shape}")
    return PromptEmbeddings(**arrays)


def save_embeddings_npz(path: str | Path, embeddings: PromptEmbeddings) -> Path:
    """Write embeddings in the layout `load_embeddings_npz` reads (negatives only when present)."""
    path = Path(path)
    arrays = {key: np.asarray(value) for key, value in dataclasses.asdict(embeddings).items() if value is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path
