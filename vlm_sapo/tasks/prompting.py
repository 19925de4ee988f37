"""One sample -> the exact prompt its task renders for it, and the meta its reward needs.

Training, the cold start and evaluation all render through `render_task_prompt`, so a benchmark row is prompted
exactly as a training row: the model family's grounding coordinate system goes into the meta first (the
grounding instruction names its units), the task's instruction follows the question, and after rendering the meta
gets `model_input_size` (the resized image the model saw) and `image_size` (the decoded original), which the
grounding reward uses to map boxes back to original pixels. The sample given is not modified.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlm_sapo.data import RenderedPrompt, Sample, render_prompt
from vlm_sapo.tasks import get_task


def render_task_prompt(processor: Any, sample: Sample, *, coord_system: str, min_pixels: int, max_pixels: int,
                       image_patch_size: int, max_prompt_tokens: int | None,
                       system: str | None = None) -> tuple[RenderedPrompt, Sample]:
    """The rendered prompt and a copy of `sample` whose meta is ready for scoring; raises `PromptTooLongError`."""
    meta = {**sample.meta, "coord_system": coord_system}
    sample = dataclasses.replace(sample, meta=meta)
    rendered = render_prompt(processor, sample, instruction=get_task(sample.task).instruction(sample),
                             min_pixels=min_pixels, max_pixels=max_pixels, image_patch_size=image_patch_size,
                             max_prompt_tokens=max_prompt_tokens, system=system)
    meta = {**meta, "model_input_size": rendered.model_input_sizes[0] if rendered.model_input_sizes else None,
            "image_size": rendered.original_sizes[0] if rendered.original_sizes else None}
    return rendered, dataclasses.replace(sample, meta=meta)


def pixel_budget(processor: Any) -> tuple[int, int, int]:
    """(min_pixels, max_pixels, patch_size) of the processor, as `load_processor(min_pixels=, max_pixels=)` set them."""
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if lo is None or hi is None:
        lo, hi = getattr(ip, "min_pixels", None), getattr(ip, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError(f"cannot read the pixel budget of {type(ip).__name__} (size={size}); pass min/max pixels")
    return int(lo), int(hi), int(ip.patch_size)
