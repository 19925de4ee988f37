"""A tiny Qwen-VL whose byte-level BPE vocabulary is trained on the task's own text.

With Qwen's real 151,936-token vocabulary a tiny model spends nearly all its time and parameters in the embedding and
the lm_head; a few hundred tokens trained on the prompts and answers make every RL step about 10x faster
(ENVIRONMENT.md), which is what lets the CPU demo learn within minutes. Everything else is the real thing: the Qwen2
pre-tokenizer regex and byte-level encoding (any text still tokenizes, byte by byte at worst), Qwen-VL's special tokens,
the real chat template, processor and model classes. `<think>`, `</think>`, `<answer>`, `</answer>` are single
(non-special) tokens, so a well-formed answer costs a handful of tokens and still decodes to the same text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from vlm_sapo.models.tiny import CONFIG_TOKENS, tiny_config, tiny_processor, write_random_checkpoint
from vlm_sapo.models.tokenizer import QWEN2_VL_CHAT_TEMPLATE, _base_tokenizer_from, qwen_vl_token_list

TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# The parts of the chat template a prompt always contains, so they get merged tokens too.
TEMPLATE_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def train_small_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, family: str = "qwen2_5_vl"):
    """A `Qwen2Tokenizer` over a BPE of at most `vocab_size` regular tokens (256 bytes + merges) learned from `texts`,
    then Qwen-VL's special tokens (in Qwen's order) and the four answer-format tags."""
    from transformers import Qwen2Tokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens, got {vocab_size}")
    empty = _base_tokenizer_from({}, [])  # Qwen2's normalizer, pre-tokenizer and decoder around an empty BPE
    tk = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                       byte_fallback=False))
    tk.normalizer, tk.pre_tokenizer, tk.decoder = empty.normalizer, empty.pre_tokenizer, empty.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in texts if t] + [TEMPLATE_TEXT]
    specials = [tok for tok, _ in qwen_vl_token_list(family)]
    strip = [*specials, *TAG_TOKENS]

    def cleaned() -> Iterable[str]:  # special tokens are added whole below; the BPE never sees their pieces
        for text in corpus:
            for s in strip:
                text = text.replace(s, " ")
            yield text

    tk.train_from_iterator(cleaned(), trainer=trainer, length=len(corpus))
    for token, special in qwen_vl_token_list(family):
        tk.add_special_tokens([AddedToken(token, special=True, normalized=False)]) if special else tk.add_tokens(
            [AddedToken(token, special=False, normalized=False)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok = Qwen2Tokenizer(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                         bos_token=None)
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    for t in (*specials, *TAG_TOKENS):
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1 or tok.convert_ids_to_tokens(ids[0]) != t:
            raise ValueError(f"small tokenizer: {t!r} does not encode to its own single token (got {ids})")
    return tok


def build_small_vocab_tiny(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    family: str = "qwen2_5_vl",
    vocab_size: int = 512,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random Qwen-VL checkpoint with a small trained vocabulary and tied embeddings.

    `overrides` size the model like `vlm_sapo.models.tiny.build_tiny` (`hidden_size=`, `vision_depth=`, ...). Written
    to a temporary folder and renamed into place, so a crash never leaves half a checkpoint.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tok = train_small_tokenizer(texts, vocab_size=vocab_size, family=family)
    token_ids = {t: tok.convert_tokens_to_ids(t) for t in CONFIG_TOKENS}
    config = tiny_config(family, vocab_size=len(tok), token_ids=token_ids, tie_word_embeddings=True, **overrides)
    processor = tiny_processor(family, tok, min_pixels=min_pixels, max_pixels=max_pixels)
    return write_random_checkpoint(out, config, processor, token_ids, seed=seed)
