"""Which token ids end a completion and which may never be sampled: one answer shared by both engines.

Banned: the vision special tokens (a sampled `<|image_pad|>` makes the learner's re-forward expect an image that is
not there) and the embedding rows past the tokenizer (Qwen pads its 151,665 tokens to 151,936 rows; a random or
lightly trained model can sample them, and they decode to nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
END_OF_TURN = "<|im_end|>"


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """`<|im_end|>`, the tokenizer's eos and every eos id of the checkpoint's generation config."""
    vocab = tokenizer.get_vocab()
    ids = set(_as_ids(tokenizer.eos_token_id)) | set(_as_ids(getattr(generation_config, "eos_token_id", None)))
    if END_OF_TURN in vocab:
        ids.add(vocab[END_OF_TURN])
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos and no <|im_end|>")
    return sorted(ids)


def banned_token_ids(tokenizer: Any, vocab_size: int, extra: Iterable[int] = ()) -> list[int]:
    """Vision special tokens, embedding rows with no token (`len(tokenizer)..vocab_size-1`), plus `extra`."""
    vocab = tokenizer.get_vocab()
    n_tokens = len(tokenizer)
    if n_tokens > vocab_size:
        raise ValueError(f"the tokenizer has {n_tokens} tokens but the model only {vocab_size} output rows")
    ids = {vocab[t] for t in VISION_TOKENS if t in vocab}
    ids.update(range(n_tokens, vocab_size))
    for i in extra:
        if not 0 <= int(i) < vocab_size:
            raise ValueError(f"banned token id {i} is outside the vocabulary [0, {vocab_size})")
        ids.add(int(i))
    return sorted(ids)


def model_vocab_size(config: Any) -> int:
    """Output rows of the lm_head (`vocab_size` of the text config for VLMs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if not size:
        raise ValueError(f"{type(config).__name__} has no vocab_size")
    return int(size)
