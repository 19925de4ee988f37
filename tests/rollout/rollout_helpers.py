"""Helpers of the rollout-engine tests: rendered prompts and an independent logprob reference."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlm_sapo.data import ImageRef, RenderedPrompt, Sample, VideoRef, prompt_model_inputs, render_prompt

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
    vision = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    kwargs = {k: inputs[k] for k in vision if k in inputs}
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


def _png(img: Image.Image) -> ImageRef:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ImageRef(data=buf.getvalue())


def clip(xs: list[int], size=(56, 56), seed: int = 0) -> VideoRef:
    """Noise frames with a block moving through positions `xs` (noise: every patch differs, so any pixel or
    position mistake shows in the logprobs)."""
    rng = np.random.default_rng(seed)
    frames = []
    for x in xs:
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        a[10:30, x:x + 20] = (220, 40, 40)
        frames.append(_png(Image.fromarray(a)))
    return VideoRef(frames=tuple(frames), num_frames=len(frames))


def video_processor_for(path, pixels: tuple[int, int, int]):
    """The checkpoint's processor with the test pixel budget and a small video budget (4 frames, 1..6 tokens a
    frame pair), as a recipe's model.video_* / data.video_* keys set it."""
    from vlm_sapo.models.loading import load_processor

    patch, lo, hi = pixels
    f = 2 * patch
    return load_processor(path, min_pixels=lo, max_pixels=hi, video_min_pixels=f * f, video_max_pixels=6 * f * f,
                          video_max_frames=4, video_fps=2.0)


def render_video_prompts(processor, pixels: tuple[int, int, int]) -> list[RenderedPrompt]:
    """Four prompts: a 4-frame video, 3 wide frames (padded to 4), an image plus a 2-frame video, an image only."""
    patch, lo, hi = pixels
    samples = [
        Sample("moves", "motion", [], "Which way does the block move?", "right", video=clip([0, 8, 16, 24])),
        Sample("odd", "motion", [], "Three frames, wide ones. Which way?", "left",
               video=clip([40, 30, 20], size=(90, 50), seed=1)),
        Sample("mixed", "motion", [drawing(70, 56, 3)], "Is the picture a frame of the video?", "no",
               video=clip([4, 12], seed=2)),
        Sample("image", "math", [drawing(56, 84, 4)], "What is drawn?", "A"),
    ]
    return [render_prompt(processor, s, instruction="Answer in one word.", min_pixels=lo, max_pixels=hi,
                          image_patch_size=patch, max_prompt_tokens=None) for s in samples]


def check_video_prompt_tokens(processor, prompts: list[RenderedPrompt], rollouts, video_pad: int = 151656) -> None:
    """Every completion's prompt ids are the processor's, with (T / 2) x (h / 2p) x (w / 2p) video tokens a video."""
    factor = 2 * processor.video_processor.patch_size
    for c in rollouts.completions:
        p = prompts[c.prompt_index]
        assert c.prompt_ids == prompt_model_inputs(processor, p)["input_ids"][0].tolist()
        assert c.prompt_ids.count(video_pad) == sum(v.frames.shape[0] // 2 * (v.size[0] // factor) *
                                                    (v.size[1] // factor) for v in p.videos)
    assert [len(p.videos) for p in prompts] == [1, 1, 1, 0]
