"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE checkpoints, built offline in seconds.

They are real checkpoints in every respect but size: the real Qwen2 vocabulary at Qwen's ids, the real chat template,
the real processor classes, and a config the real model classes (transformers and vLLM) load. Tests, the demo and
`vlm-sapo init-tiny` use them so that no hub access is ever needed.

    python -m vlm_sapo.models.tiny runs/tiny25 --family qwen2_5_vl
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .moe import check_layouts_distinct, save_policy
from .tokenizer import QWEN2_VL_CHAT_TEMPLATE, check_qwen_vl_token_ids, qwen_vl_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Qwen3-VL-MoE is Qwen3-VL (same vision tower, processor, tokens and mRoPE) with sparse MoE blocks in the text model.
_DENSE_BASE = {"qwen3_vl_moe": "qwen3_vl"}
# A few experts, top-2 routing (Qwen3-VL-30B-A3B: 128 experts, top-8, an expert 768 wide beside hidden 2048): enough
# experts that routing can change, small enough for a CPU.
# `norm_topk_prob` is not a field of transformers' config (its router always renormalises the top-k weights) but the
# real checkpoints' config.json carries it and vLLM's Qwen3-MoE block reads it.
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96, "decoder_sparse_step": 1,
            "norm_topk_prob": True}


TINY_PREFIX = "tiny:"


def resolve_tiny(path: str) -> str:
    """`tiny:<family>` builds (once, cached) a tiny random Qwen-VL offline; anything else is returned as is."""
    if not path.startswith(TINY_PREFIX):
        return path
    import hashlib

    from . import tokenizer as tok

    family = path[len(TINY_PREFIX):]
    # keyed by the builder's source, so a changed builder never serves a stale cached model
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(tok.__file__).read_bytes()).hexdigest()[:12]
    out = tok.default_cache_dir() / "tiny" / f"{family}-{digest}"
    if not (out / "config.json").is_file():
        build_tiny(out, family=family)
    return str(out)


def dense_base(family: str) -> str:
    """The dense family whose vision tower, processor and tokens a family shares (itself for the dense ones)."""
    return _DENSE_BASE.get(family, family)


def image_token_pixels(family: str) -> int:
    """Side in pixels of the square one image token covers (patch x spatial merge): 28, or 32 for Qwen3-VL."""
    vision = _VISION_BY_FAMILY[dense_base(family)]
    return int(vision["patch_size"]) * int(vision["spatial_merge_size"])

VOCABS = ("qwen2",)
QWEN2_PADDED_VOCAB = 151936  # Qwen's embedding rows: 151,643 regular + added tokens, padded for GPU efficiency

# Shared text sizes (ENVIRONMENT.md): head_dim 32, so the rope sections sum to 16.
_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
_TEXT_BY_FAMILY: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6}},
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6}},
    "qwen3_vl": {
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
            "rope_theta": 5e6,
        },
    },
}
_TEXT_BY_FAMILY["qwen3_vl_moe"] = {**_TEXT_BY_FAMILY["qwen3_vl"], **TINY_MOE}
_VISION_BY_FAMILY: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "hidden_size": 128,  # Qwen2-VL's vision `hidden_size` is the merger's output width (= text hidden)
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
    "qwen3_vl": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": 128,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # must be a perfect square (a learned 8x8 grid, interpolated)
        "deepstack_visual_indexes": [0],
    },
}
# Image-processor defaults: small images keep tests fast (at most 64 image tokens per image).
_PIXELS = {
    "qwen2_vl": (56 * 56, 64 * 28 * 28),
    "qwen2_5_vl": (56 * 56, 64 * 28 * 28),
    "qwen3_vl": (64 * 64, 64 * 32 * 32),
}


@dataclasses.dataclass(frozen=True)
class _FamilyClasses:
    config: type
    processor: type
    video_processor: type


def _classes(family: str) -> _FamilyClasses:
    import transformers as tf

    if family == "qwen2_vl":
        return _FamilyClasses(tf.Qwen2VLConfig, tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor)
    if family == "qwen2_5_vl":
        return _FamilyClasses(tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor)
    if family == "qwen3_vl":
        return _FamilyClasses(tf.Qwen3VLConfig, tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor)
    if family == "qwen3_vl_moe":  # transformers has no Qwen3VLMoe processor: the checkpoints ship Qwen3VLProcessor
        return _FamilyClasses(tf.Qwen3VLMoeConfig, tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_config(
    family: str = "qwen2_5_vl",
    *,
    vocab_size: int = QWEN2_PADDED_VOCAB,
    token_ids: dict[str, int],
    tie_word_embeddings: bool = False,
    **overrides: Any,
):
    """The tiny config; `vision_<key>=` overrides the vision tower, any other key the text model."""
    classes = _classes(family)
    text = {**_TEXT, **_TEXT_BY_FAMILY[family], "vocab_size": vocab_size}
    vision = dict(_VISION_BY_FAMILY[dense_base(family)])
    text_cls = classes.config.sub_configs["text_config"]
    vision_cls = classes.config.sub_configs["vision_config"]
    for key, value in overrides.items():
        if key.startswith("vision_"):
            field = key.removeprefix("vision_")
            if not hasattr(vision_cls(), field):
                raise ValueError(f"{family}: unknown vision config key {field!r} (from override {key!r})")
            vision[field] = value
        else:
            if not hasattr(text_cls(), key):
                raise ValueError(f"{family}: unknown text config key {key!r}; vision keys take a 'vision_' prefix")
            text[key] = value
    # The vision merger's output feeds the text model, so its width follows the text hidden size unless set.
    out_key = "hidden_size" if family == "qwen2_vl" else "out_hidden_size"
    if f"vision_{out_key}" not in overrides:
        vision[out_key] = text["hidden_size"]
    if dense_base(family) == "qwen3_vl":
        side = int(round(vision["num_position_embeddings"] ** 0.5))
        if side * side != vision["num_position_embeddings"]:
            raise ValueError(
                f"qwen3_vl: vision num_position_embeddings must be a perfect square, "
                f"got {vision['num_position_embeddings']}"
            )
    if family == "qwen3_vl_moe":
        check_layouts_distinct(text["hidden_size"], text["moe_intermediate_size"])
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    section = text["rope_parameters"]["mrope_section"]
    if 2 * sum(section) != head_dim:
        raise ValueError(f"{family}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    if hasattr(text_cls(), "tie_word_embeddings"):  # Qwen3-VL-MoE's text config has its own flag (default True)
        text["tie_word_embeddings"] = tie_word_embeddings
    text.update(
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )
    return classes.config(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_processor(family: str, tokenizer, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """The family's real processor class around `tokenizer`, with small default image sizes."""
    from transformers import Qwen2VLImageProcessor

    classes = _classes(family)
    lo, hi = _PIXELS[dense_base(family)]
    min_pixels = lo if min_pixels is None else min_pixels
    max_pixels = hi if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if dense_base(family) == "qwen3_vl":
        # Qwen3-VL's preprocessor: patch 16, mean/std 0.5 (real Qwen3-VL preprocessor_config.json).
        image_processor = Qwen2VLImageProcessor(
            size=size, patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    else:
        image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    # The per-frame pixel cap is qwen-vl-utils' (reference) behaviour, and transformers' default from 5.22.
    video_processor = classes.video_processor(cap_pixels_per_frame=True)
    return classes.processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _tokenizer_for(vocab: str, family: str):
    if vocab == "qwen2":
        return qwen_vl_tokenizer(family), QWEN2_PADDED_VOCAB
    raise ValueError(f"unknown vocabulary {vocab!r}; available: {', '.join(VOCABS)}")


# The special tokens whose ids the model config and generation config name.
CONFIG_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def build_tiny(
    out_dir: str | os.PathLike,
    family: str = "qwen2_5_vl",
    *,
    seed: int = 0,
    vocab: str = "qwen2",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    tie_word_embeddings: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random Qwen-VL checkpoint (config, fp32 safetensors, tokenizer, processors, generation config).

    `overrides` resize the model: text keys as they are (`hidden_size=64`), vision keys prefixed (`vision_depth=1`).
    The folder is written next to `out_dir` and renamed into place, so a crash never leaves a half checkpoint.
    """

    out = Path(out_dir)
    _classes(family)  # validate the family before any work
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (or --overwrite) to replace it")
    tokenizer, vocab_size = _tokenizer_for(vocab, family)
    if vocab == "qwen2":
        check_qwen_vl_token_ids(tokenizer, family)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CONFIG_TOKENS}
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embedding rows")
    config = tiny_config(
        family, vocab_size=vocab_size, token_ids=token_ids, tie_word_embeddings=tie_word_embeddings, **overrides
    )
    processor = tiny_processor(family, tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)

    return write_random_checkpoint(out, config, processor, token_ids, seed=seed)


def write_random_checkpoint(out: Path, config: Any, processor: Any, token_ids: dict[str, int], *, seed: int) -> Path:
    """A random model from `config` with its processor, written to a temporary folder and renamed into place, so a
    crash never leaves half a checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_policy(model, tmp)
        processor.save_pretrained(tmp)
        _make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the checkpoint the permissions a normal save would have (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm_sapo.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the checkpoint to")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", choices=VOCABS, default="qwen2")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    path = build_tiny(args.out_dir, args.family, seed=args.seed, vocab=args.vocab, overwrite=args.overwrite)
    print(f"tiny {args.family} written to {path}")


if __name__ == "__main__":
    main()
