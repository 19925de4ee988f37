"""Rendering a Sample into the exact prompt text and pixels that both rollout engines and the learner consume.

Images are resized here, once, with qwen-vl-utils' `fetch_image` (smart_resize to multiples of patch x merge within
min/max pixels), and the processor is then called with `do_resize=False`: the pixels the vLLM engine, the HF engine
and the learner see are the same by construction, and the image-token count is (h / (patch*merge)) * (w / (patch*merge))
per image: 28 for Qwen2/2.5-VL (patch 14), 32 for Qwen3-VL (patch 16). A prompt over `max_prompt_tokens` is dropped or
fails, never truncated, because truncation would cut through image tokens.

A video is sampled (`Sample.load_video`: at most `max_frames` frames, a file at `fps`), padded to an even frame count
by repeating its last frame and resized once, every frame to one size, with qwen-vl-utils' `smart_resize` within the
per-frame pixel budget and its resize (bicubic, antialiased); the frames, their size and the sampling metadata
(source fps, kept frame indices, source frame count: Qwen2.5-VL's temporal positions and Qwen3-VL's timestamps come
from it) travel in the `RenderedPrompt`, and the processor is called with `do_resize=False, do_sample_frames=False`.
(qwen-vl-utils 0.0.14's `fetch_video` would pre-resize a frame list with a doubled patch factor, squashing non-square
frames, so the frames are stacked here and its resize step is applied once.) The video budget is the processor's own
(`load_processor(video_min_pixels=, video_max_pixels=, video_max_frames=, video_fps=)`), read by `video_budget`, so
training, evaluation and the cold start render one video alike. Video tokens are counted by the processor itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlm_sapo.data.images import ImageError
from vlm_sapo.data.loaders import DataError
from vlm_sapo.data.sample import IMAGE_PLACEHOLDER, Sample

SPATIAL_MERGE_SIZE = 2  # qwen-vl-utils' constant; checked against the processor's merge_size


class PromptTooLongError(DataError):
    """The rendered prompt, image tokens included, is longer than `max_prompt_tokens`."""


@dataclass(frozen=True)
class VideoBudget:
    """Per-frame pixel budget, frame budget and the sampling rate of a video (file) or of a frame list."""

    min_pixels: int
    max_pixels: int
    max_frames: int
    fps: float


def video_budget(processor: Any) -> VideoBudget:
    """The processor's video budget, as `load_processor(video_min_pixels=, ...)` set it (the checkpoint's otherwise;
    qwen-vl-utils' 2 fps where the checkpoint names no rate)."""
    vp = processor.video_processor
    size = dict(vp.size)
    return VideoBudget(int(size["shortest_edge"]), int(size["longest_edge"]), int(vp.max_frames),
                       float(getattr(vp, "fps", None) or 2.0))


@dataclass
class RenderedVideo:
    """A video ready for the model: uint8 frames [T, 3, H, W] (T even, H and W multiples of patch x merge) and the
    sampling metadata transformers and vLLM both take (`metadata()`)."""

    frames: torch.Tensor
    fps: float
    frames_indices: list[int]
    total_num_frames: int

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[-1]), int(self.frames.shape[-2])

    def metadata(self) -> dict[str, Any]:
        return {"fps": self.fps, "frames_indices": list(self.frames_indices), "total_num_frames": self.total_num_frames,
                "duration": self.total_num_frames / self.fps, "video_backend": "vlm_sapo"}


@dataclass
class RenderedPrompt:
    """A prompt ready for generation: chat-templated text plus pre-resized RGB images and videos.

    `model_input_sizes` are (width, height) of the resized images (Qwen2.5-VL answers boxes in these pixels);
    `original_sizes` are (width, height) of the decoded images (after EXIF orientation), to map boxes back.
    """

    id: str
    text: str
    images: list[Image.Image]
    model_input_sizes: list[tuple[int, int]]
    num_prompt_tokens: int
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    videos: list[RenderedVideo] = field(default_factory=list)


@dataclass(frozen=True)
class DroppedPrompt:
    id: str
    reason: str  # "too_long"
    detail: str


@dataclass
class RenderResult:
    prompts: list[RenderedPrompt]
    dropped: list[DroppedPrompt]

    def dropped_counts(self) -> dict[str, int]:
        return dict(Counter(d.reason for d in self.dropped))


def user_text(question: str, instruction: str) -> str:
    """The question followed by the task's format instruction, on its own line."""
    return f"{question}\n{instruction}" if instruction else question


def user_content(sample: Sample, n_images: int, n_videos: int, instruction: str) -> list[dict[str, str]]:
    """The user turn: the images (then the video) before the question and its instruction, or, where the question
    holds `<image>` placeholders (one per image, as in LLaVA-style and EasyR1 data), each image where its
    placeholder stands: the model then reads the question before the image, and the image tokens can attend to it."""
    parts = sample.question.split(IMAGE_PLACEHOLDER)
    if len(parts) == 1:
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        content += [{"type": "video"} for _ in range(n_videos)]
        return content + [{"type": "text", "text": user_text(sample.question, instruction)}]
    if len(parts) - 1 != n_images:
        raise DataError(f"sample {sample.id!r}: the question has {len(parts) - 1} {IMAGE_PLACEHOLDER!r} "
                        f"placeholder(s) for {n_images} image(s); give one per image, or none")
    content = [{"type": "video"} for _ in range(n_videos)]
    for k, text in enumerate(parts):
        if k == len(parts) - 1:
            text = user_text(text.strip(), instruction)
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
        if k < n_images:
            content.append({"type": "image"})
    return content


def _patch_factor(processor: Any, image_patch_size: int) -> int:
    ip = processor.image_processor
    patch = getattr(ip, "patch_size", None)
    merge = getattr(ip, "merge_size", None)
    if patch != image_patch_size:
        raise ValueError(f"image_patch_size={image_patch_size} but the processor's patch_size is {patch} "
                         f"(Qwen2/2.5-VL: 14, Qwen3-VL: 16)")
    if merge != SPATIAL_MERGE_SIZE:
        raise ValueError(f"processor merge_size {merge} differs from qwen-vl-utils' {SPATIAL_MERGE_SIZE}")
    return image_patch_size * SPATIAL_MERGE_SIZE


def render_prompt(
    processor: Any,
    sample: Sample,
    *,
    instruction: str,
    min_pixels: int,
    max_pixels: int,
    image_patch_size: int = 14,
    max_prompt_tokens: int | None,
    system: str | None = None,
) -> RenderedPrompt:
    """Chat-template the sample (images, then question + instruction; see `user_content`) and resize its images for the model.

    Raises `PromptTooLongError` over `max_prompt_tokens` and `DataError` (naming the sample) for images that cannot
    be loaded or resized; `ValueError` for settings that do not fit the processor.
    """
    from qwen_vl_utils import fetch_image  # imports torchvision; keep it off the loaders' import path

    factor = _patch_factor(processor, image_patch_size)
    if not factor * factor <= min_pixels <= max_pixels:
        raise ValueError(f"need {factor}^2 <= min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                         f"max_pixels={max_pixels}")
    try:
        originals = sample.load_images()
    except ImageError as err:
        raise DataError(f"sample {sample.id!r}: {err}") from err
    images, sizes = [], []
    for k, img in enumerate(originals):
        try:
            resized = fetch_image({"image": img, "min_pixels": min_pixels, "max_pixels": max_pixels},
                                  image_patch_size=image_patch_size)
        except ValueError as err:  # aspect ratio over 200, or a side rounded down to 0 pixels
            raise DataError(f"sample {sample.id!r} image {k} ({img.width}x{img.height}) cannot be resized for "
                            f"min_pixels={min_pixels}, max_pixels={max_pixels}: {err}") from err
        w, h = resized.size
        if w % factor or h % factor or not min_pixels <= w * h <= max_pixels:
            raise DataError(f"sample {sample.id!r} image {k}: resized to {w}x{h}, not multiples of {factor} within "
                            f"[{min_pixels}, {max_pixels}] pixels")
        images.append(resized)
        sizes.append((w, h))

    videos = [] if sample.video is None else [_render_video(processor, sample, factor, image_patch_size)]

    content = user_content(sample, len(images), len(videos), instruction)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    image_token, video_token = processor.image_token, getattr(processor, "video_token", "<|video_pad|>")
    if text.count(image_token) != len(images) or text.count(video_token) != len(videos):
        raise DataError(f"sample {sample.id!r}: prompt has {text.count(image_token)} '{image_token}' for "
                        f"{len(images)} image(s) and {text.count(video_token)} '{video_token}' for {len(videos)} "
                        "video(s): the question or instruction contains vision special tokens")
    tokens_per_image = [(w // factor) * (h // factor) for w, h in sizes]
    if videos:  # video tokens (and Qwen3-VL's timestamps) as the processor expands them
        num_tokens = len(_call_processor(processor, text, images, videos)["input_ids"][0])
    else:
        num_tokens = len(processor.tokenizer(text)["input_ids"]) + sum(n - 1 for n in tokens_per_image)
    if max_prompt_tokens is not None and num_tokens > max_prompt_tokens:
        raise PromptTooLongError(f"sample {sample.id!r}: prompt is {num_tokens} tokens ({sum(tokens_per_image)} "
                                 f"image tokens{', and a video' if videos else ''}), above "
                                 f"max_prompt_tokens={max_prompt_tokens}")
    return RenderedPrompt(id=sample.id, text=text, images=images, model_input_sizes=sizes,
                          num_prompt_tokens=num_tokens, original_sizes=[im.size for im in originals], videos=videos)


def _render_video(processor: Any, sample: Sample, factor: int, image_patch_size: int) -> RenderedVideo:
    """Sample, pad to an even count, stack and resize the video once (see the module docstring)."""
    from qwen_vl_utils.vision_process import smart_resize
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    budget = video_budget(processor)
    if processor.video_processor.patch_size != image_patch_size:
        raise ValueError(f"image_patch_size={image_patch_size} but the video processor's patch_size is "
                         f"{processor.video_processor.patch_size}")
    try:
        decoded = sample.load_video(max_frames=budget.max_frames, fps=budget.fps)
    except ImageError as err:
        raise DataError(f"sample {sample.id!r} video: {err}") from err
    frames, indices = list(decoded.frames), list(decoded.frames_indices)
    temporal = int(processor.video_processor.temporal_patch_size)
    while len(frames) % temporal:  # qwen-vl-utils' padding: repeat the last frame
        frames.append(frames[-1])
        indices.append(indices[-1])
    w, h = frames[0].size
    if any(f.size != (w, h) for f in frames):
        raise DataError(f"sample {sample.id!r} video: its frames differ in size ({sorted({f.size for f in frames})})")
    try:
        new_h, new_w = smart_resize(h, w, factor=factor, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    except ValueError as err:
        raise DataError(f"sample {sample.id!r} video ({w}x{h} frames) cannot be resized for video_min_pixels="
                        f"{budget.min_pixels}, video_max_pixels={budget.max_pixels}: {err}") from err
    stacked = torch.stack([torch.from_numpy(np.array(f, dtype=np.uint8)).permute(2, 0, 1) for f in frames])
    out = resize(stacked, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return RenderedVideo(out.contiguous(), decoded.fps, indices, decoded.total_num_frames)


def _call_processor(processor: Any, text: str, images: list[Image.Image], videos: list[RenderedVideo]) -> Any:
    """The processor on one prompt with its pre-resized images and videos, nothing resized or resampled again."""
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs.update(images=images, do_resize=False)
    if videos:
        kwargs.update(videos=[v.frames for v in videos], video_metadata=[v.metadata() for v in videos],
                      do_resize=False, do_sample_frames=False)
    return processor(**kwargs)


def render_prompts(
    processor: Any,
    samples: list[Sample],
    *,
    instruction: str | dict[str, str],
    on_too_long: Literal["drop", "fail"] = "drop",
    **kwargs: Any,
) -> RenderResult:
    """Render many samples; over-long prompts are dropped and counted (`"drop"`) or raise (`"fail"`).

    `instruction` may be a dict task -> instruction for a task mix. Other keyword arguments go to `render_prompt`.
    """
    if on_too_long not in ("drop", "fail"):
        raise ValueError(f"on_too_long must be 'drop' or 'fail', got {on_too_long!r}")
    prompts, dropped = [], []
    for sample in samples:
        if isinstance(instruction, dict):
            if sample.task not in instruction:
                raise ValueError(f"no instruction for task {sample.task!r} (sample {sample.id!r})")
            text = instruction[sample.task]
        else:
            text = instruction
        try:
            prompts.append(render_prompt(processor, sample, instruction=text, **kwargs))
        except PromptTooLongError as err:
            if on_too_long == "fail":
                raise
            dropped.append(DroppedPrompt(sample.id, "too_long", str(err)))
    return RenderResult(prompts, dropped)


def prompt_model_inputs(processor: Any, rendered: RenderedPrompt) -> dict[str, Any]:
    """The processor's tensors for one rendered prompt (input_ids, attention_mask, pixel_values, image_grid_thw,
    mm_token_type_ids, ...), batch size 1, with the images used exactly as rendered (`do_resize=False`).

    Checks that the processor produced the token count and grids `render_prompt` promised, so an engine and the
    learner cannot silently disagree on image tokens.
    """
    out = dict(_call_processor(processor, rendered.text, rendered.images, rendered.videos))
    n = int(out["input_ids"].shape[-1])
    if n != rendered.num_prompt_tokens:
        raise RuntimeError(f"prompt {rendered.id!r}: the processor gives {n} tokens, render_prompt counted "
                           f"{rendered.num_prompt_tokens}")
    if rendered.images:
        patch = processor.image_processor.patch_size
        expected = [[1, h // patch, w // patch] for w, h in rendered.model_input_sizes]
        got = out["image_grid_thw"].tolist()
        if got != expected:
            raise RuntimeError(f"prompt {rendered.id!r}: image_grid_thw {got} != expected {expected}")
    if rendered.videos:
        vp = processor.video_processor
        expected = [[v.frames.shape[0] // vp.temporal_patch_size, v.size[1] // vp.patch_size, v.size[0] // vp.patch_size]
                    for v in rendered.videos]
        got = out["video_grid_thw"].tolist()
        if got != expected:
            raise RuntimeError(f"prompt {rendered.id!r}: video_grid_thw {got} != expected {expected}")
    return out
