"""Prompt rendering: pre-resized pixels, exact image-token counts for both Qwen families, no truncation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_sapo.data import DataError, Sample
from vlm_sapo.data.prompts import (
    PromptTooLongError,
    prompt_model_inputs,
    render_prompt,
    render_prompts,
    user_text,
)

# family fixture -> (patch size, min_pixels, max_pixels) used for rendering
FAMILIES = {
    "tiny_qwen25_dir": (14, 56 * 56, 64 * 28 * 28),
    "tiny_qwen3_dir": (16, 64 * 64, 64 * 32 * 32),
}
SIZES = [(64, 48), (10, 10), (300, 200), (1000, 50), (57, 113), (1, 150)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(request.param))
    return processor, *FAMILIES[request.param]


def reference_resize(w: int, h: int, factor: int, min_px: int, max_px: int) -> tuple[int, int]:
    """Qwen's smart_resize rule, written out: round each side to the factor, then scale into [min_px, max_px]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_px:
        beta = math.sqrt(h * w / max_px)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_px:
        beta = math.sqrt(min_px / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return wb, hb


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def sample(*images: Image.Image, question: str = "How many sides?", sid: str = "s0") -> Sample:
    return Sample(id=sid, task="math", images=list(images), question=question, answer="A", meta={})


def render(processor, s, patch, lo, hi, **kw):
    kw.setdefault("max_prompt_tokens", None)
    kw.setdefault("instruction", "Answer with a letter.")
    return render_prompt(processor, s, min_pixels=lo, max_pixels=hi, image_patch_size=patch, **kw)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_image_tokens_match_pre_resized_image(family, size):
    processor, patch, lo, hi = family
    factor = 2 * patch
    rendered = render(processor, sample(noise(*size)), patch, lo, hi)
    w, h = reference_resize(*size, factor, lo, hi)
    assert rendered.model_input_sizes == [(w, h)] and rendered.images[0].size == (w, h)
    assert rendered.original_sizes == [size]
    assert w % factor == 0 and h % factor == 0 and lo <= w * h <= hi

    inputs = prompt_model_inputs(processor, rendered)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    n_image = int((inputs["input_ids"] == image_id).sum())
    assert n_image == (h // factor) * (w // factor)
    assert inputs["input_ids"].shape[-1] == rendered.num_prompt_tokens
    assert inputs["image_grid_thw"].tolist() == [[1, h // patch, w // patch]]
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == image_id)
    assert inputs["attention_mask"].all()


def test_pixels_reach_the_model_unresampled(family):
    """The processor must not resize again: its pixel values are exactly the rendered image, normalised.

    max_pixels is 4x the processor's own longest_edge, so a processor-side resize would shrink the image.
    """
    processor, patch, lo, hi = family
    assert processor.image_processor.size["longest_edge"] == hi
    rendered = render(processor, sample(noise(600, 400, seed=3)), patch, lo, 4 * hi)
    assert rendered.images[0].width * rendered.images[0].height > hi
    pixels = prompt_model_inputs(processor, rendered)["pixel_values"]
    ip = processor.image_processor
    arr = np.asarray(rendered.images[0], dtype=np.float64) / 255.0
    t = ip.temporal_patch_size
    per_channel = pixels.double().reshape(pixels.shape[0], 3, t * patch * patch)
    for c in range(3):
        expected = np.sort(np.repeat(((arr[..., c] - ip.image_mean[c]) / ip.image_std[c]).ravel(), t))
        got = np.sort(per_channel[:, c].numpy().ravel())
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_multiple_images_text_layout_and_system(family):
    processor, patch, lo, hi = family
    factor = 2 * patch
    s = sample(noise(64, 64), noise(200, 100, seed=1), question="Which is larger?")
    rendered = render(processor, s, patch, lo, hi, system="You are careful.", instruction="Reply A or B.")
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered.text.startswith("<|im_start|>system\nYou are careful.<|im_end|>\n<|im_start|>user\n")
    assert f"{vision}{vision}Which is larger?\nReply A or B.<|im_end|>\n<|im_start|>assistant\n" in rendered.text
    assert rendered.text.endswith("<|im_start|>assistant\n")
    inputs = prompt_model_inputs(processor, rendered)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    expected = sum(
        (w // factor) * (h // factor)
        for w, h in (reference_resize(64, 64, factor, lo, hi), reference_resize(200, 100, factor, lo, hi))
    )
    assert int((inputs["input_ids"] == image_id).sum()) == expected
    assert inputs["image_grid_thw"].shape == (2, 3)
    assert user_text("q", "") == "q"


def test_image_placeholders_put_each_image_where_it_stands(family):
    processor, patch, lo, hi = family
    factor = 2 * patch
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    s = sample(noise(64, 64), noise(200, 100, seed=1), question="Left: <image> right: <image> which is larger?")
    rendered = render(processor, s, patch, lo, hi, instruction="Reply A or B.")
    assert f"<|im_start|>user\nLeft:{vision}right:{vision}which is larger?\nReply A or B.<|im_end|>" in rendered.text
    inputs = prompt_model_inputs(processor, rendered)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    sizes = (reference_resize(64, 64, factor, lo, hi), reference_resize(200, 100, factor, lo, hi))
    assert int((inputs["input_ids"] == image_id).sum()) == sum((w // factor) * (h // factor) for w, h in sizes)
    # the question first, then its image: the image tokens come after every question token
    question_ids = processor.tokenizer("Find it.", add_special_tokens=False)["input_ids"]
    r1 = render(processor, sample(noise(64, 64), question="Find it. <image>"), patch, lo, hi, instruction="")
    assert f"Find it.{vision}<|im_end|>" in r1.text
    ids1 = prompt_model_inputs(processor, r1)["input_ids"][0].tolist()
    start = next(i for i in range(len(ids1)) if ids1[i:i + len(question_ids)] == question_ids)
    assert start + len(question_ids) <= ids1.index(image_id)
    with pytest.raises(DataError, match=r"sample 's2'.* 1 '<image>' placeholder\(s\) for 2 image\(s\)"):
        render(processor, sample(noise(64, 64), noise(64, 64), question="Only <image>", sid="s2"), patch, lo, hi)


def test_over_long_prompts_dropped_or_fail_never_truncated(family):
    processor, patch, lo, hi = family
    factor = 2 * patch
    small, big = sample(noise(40, 40), sid="small"), sample(noise(500, 500), sid="big")
    n_small = render(processor, small, patch, lo, hi, instruction="Answer.").num_prompt_tokens
    n_big = render(processor, big, patch, lo, hi, instruction="Answer.").num_prompt_tokens
    assert n_big > n_small
    limit = n_small  # fits the small prompt exactly, not the big one
    kw = dict(instruction="Answer.", min_pixels=lo, max_pixels=hi, image_patch_size=patch, max_prompt_tokens=limit)
    result = render_prompts(processor, [big, small], **kw)
    assert [p.id for p in result.prompts] == ["small"]
    assert result.dropped_counts() == {"too_long": 1} and result.dropped[0].id == "big"
    kept = result.prompts[0]
    inputs = prompt_model_inputs(processor, kept)
    assert inputs["input_ids"].shape[-1] == kept.num_prompt_tokens == limit
    w, h = reference_resize(40, 40, factor, lo, hi)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((inputs["input_ids"] == image_id).sum()) == (w // factor) * (h // factor)
    with pytest.raises(PromptTooLongError, match=rf"'big'.*above max_prompt_tokens={limit}"):
        render_prompts(processor, [small, big], on_too_long="fail", **kw)


def test_settings_and_content_errors(family):
    processor, patch, lo, hi = family
    other = 14 if patch == 16 else 16
    with pytest.raises(ValueError, match=f"image_patch_size={other} but the processor's patch_size is {patch}"):
        render(processor, sample(noise(50, 50)), other, lo, hi)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        render(processor, sample(noise(50, 50)), patch, hi, lo)
    with pytest.raises(DataError, match="vision special tokens"):
        render(processor, sample(noise(50, 50), question="look <|image_pad|> here"), patch, lo, hi)
    # A side of 2 pixels next to 398: smart_resize rounds it down to 0 under a small max_pixels.
    with pytest.raises(DataError, match=r"'s0' image 0 \(398x2\) cannot be resized"):
        render(processor, sample(noise(398, 2)), patch, lo, lo)
