"""Helpers of the rollout-engine tests: rendered prompts and an independent logprob reference."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlm_sapo.data import RenderedPrompt, Sample, prompt_model_inputs, render_prompt

# Pixel budgets used for rendering: (patch, min_pixels, max_pixels); image tokens are (w / 2p) * (h / 2p).
QWEN25_PIXELS = (14, 56 * 56, 12 * 28 * 28)
QWEN3_PIXELS = (16, 64 * 64, 12 * 32 * 32)


def drawing(w: int, h: int, seed: int) -> Image.Image:
    """A deterministic picture: noise background with a filled rectangle and an ellipse."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([w // 5, h // 5, w // 2, h // 2], fill=(200, 30, 30))
    d.ellipse([w // 2, h // 3, w - 5, h - 5], fill=(30, 30, 200))
    return img


def render_test_prompts(processor, pixels: tuple[int, int, int] = QWEN25_PIXELS) -> list[RenderedPrompt]:
    """Three prompts of different lengths: two images of different sizes (so different image-token counts) and
    one text-only prompt."""
    samples = [
        Sample(id="wide", task="math", images=[drawing(120, 70, 0)], question="What is the area of the red box?",
               answer="A"),
        Sample(id="tall", task="math", images=[drawing(56, 150, 1)],
               question="How many shapes are there? Think step by step, then answer.", answer="B"),
        Sample(id="text", task="math", images=[], question="What is 2 + 3?", answer="5"),
    ]
    patch, lo, hi = pixels
    return [render_prompt(processor, s, instruction="Answer with one letter.", min_pixels=lo, max_pixels=hi,
                          image_patch_size=patch, max_prompt_tokens=None) for s in samples]


def forward_logprobs(model, processor, prompt: RenderedPrompt, completion_ids: list[int], temperature: float):
    """Reference: one plain transformers forward over prompt + completion (no padding, no chunking), then
    log_softmax(logits / T) at each completion token. Independent of both engines and of `token_logprobs`."""
    inputs = prompt_model_inputs(processor, prompt)
    prompt_len = inputs["input_ids"].shape[1]
    completion = torch.tensor([completion_ids])
    ids = torch.cat([inputs["input_ids"], completion], dim=1)
    kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **kwargs).logits
    logits = logits[0, prompt_len - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, completion[0][:, None])[:, 0]


def learner_logprobs(model, processor, prompts: list[RenderedPrompt], rollouts, temperature: float):
    """The learner's recomputation (`token_logprobs` over a `build_policy_inputs` batch), one row per completion."""
    from vlm_sapo.models.logprobs import build_policy_inputs, token_logprobs

    per_prompt = [prompt_model_inputs(processor, p) for p in prompts]
    comps = rollouts.completions
    batch = build_policy_inputs([per_prompt[c.prompt_index] for c in comps], [c.completion_ids for c in comps],
                                processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch, temperature=temperature)
    return [logp[b, len(c.prompt_ids) : len(c.prompt_ids) + len(c.completion_ids)] for b, c in enumerate(comps)]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel())
