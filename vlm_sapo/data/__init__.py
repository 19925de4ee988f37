"""Samples, validated loaders, safe image loading and prompt rendering."""

from vlm_sapo.data.images import ImageError, ImageRef, open_image, to_rgb
from vlm_sapo.data.loaders import BadRow, DataError, LoadResult, load_samples
from vlm_sapo.data.prompts import (
    DroppedPrompt,
    PromptTooLongError,
    RenderedPrompt,
    RenderedVideo,
    RenderResult,
    VideoBudget,
    prompt_model_inputs,
    render_prompt,
    render_prompts,
    video_budget,
)
from vlm_sapo.data.sample import Sample
from vlm_sapo.data.videos import DecodedVideo, VideoError, VideoRef, load_video

__all__ = [
    "BadRow",
    "DataError",
    "DroppedPrompt",
    "ImageError",
    "ImageRef",
    "LoadResult",
    "PromptTooLongError",
    "RenderResult",
    "RenderedPrompt",
    "RenderedVideo",
    "Sample",
    "VideoBudget",
    "VideoError",
    "VideoRef",
    "DecodedVideo",
    "load_samples",
    "open_image",
    "prompt_model_inputs",
    "render_prompt",
    "render_prompts",
    "to_rgb",
    "load_video",
    "video_budget",
]
