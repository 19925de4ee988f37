"""Loading a Qwen-VL policy and its processor, from a local folder or (when online or cached) a hub id.

Offline is the default on the machines this project runs on (`HF_HUB_OFFLINE=1`): a hub id that is not in the local
cache fails at once with a message saying so, instead of retrying a network that is not there.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
DType = Literal["auto", "float32", "bfloat16", "float16"]


def model_family(config: Any) -> str:
    """'qwen2_vl' | 'qwen2_5_vl' | 'qwen3_vl' | 'qwen3_vl_moe' from a transformers config (or its `model_type`)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}: vlm_sapo supports {', '.join(SUPPORTED_FAMILIES)} "
            "(their mRoPE position ids are rebuilt for prompt + completion; other models would be scored wrong)"
        )
    return model_type


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(path_or_id: str | os.PathLike) -> str:
    """A local folder that holds config.json, or a hub id; clear errors for missing folders and offline hub ids."""
    name = os.fspath(path_or_id)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"model path {local} is a file; expected a checkpoint folder with config.json")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model folder {local} has no config.json (is it a checkpoint folder?)")
        return str(local)
    if not _HUB_ID.match(name) or name.endswith((".", "-")):
        raise FileNotFoundError(f"model folder {local} does not exist")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise FileNotFoundError(
                f"{name!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                "downloading it: pass a local checkpoint folder (e.g. `vlm-sapo init-tiny DIR`) or download it first"
            )
    return name


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype must be one of auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def load_policy(
    path_or_id: str | os.PathLike,
    *,
    dtype: DType = "auto",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE model for training or scoring.

    dtype "auto" is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and make logprob checks noisy).
    `device` None means CUDA when available, else CPU.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    name = resolve_model_path(path_or_id)
    extra: dict[str, Any] = {}
    if trust_remote_code:
        log.warning("loading %s with trust_remote_code=True: its own Python code will run", name)
        extra["trust_remote_code"] = True
    config = AutoConfig.from_pretrained(name, **extra)
    family = model_family(config)
    model = AutoModelForImageTextToText.from_pretrained(
        name, config=config, dtype=torch_dtype, attn_implementation=attn_implementation, **extra
    )
    model.to(device)
    from vlm_sapo.models.rope import use_released_video_rope

    use_released_video_rope(model)  # text after a video where the released models and vLLM put it
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings and needs no `enable_input_require_grads` hack.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    log.info("loaded %s (%s, %s) on %s", name, family, torch_dtype, device)
    return model


def load_processor(
    path_or_id: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
    video_max_frames: int | None = None,
    video_fps: float | None = None,
):
    """The checkpoint's processor, with the image pixel budget (and the video budget) overridden when given.

    The budget decides `image_grid_thw` and the number of image tokens, so the same values must reach the rollout
    engine and the learner; it is set on the image processor itself (processor-call `min_pixels` is deprecated).
    The video budget (per-frame pixels, frames, frames per second) is set on the video processor, where
    `vlm_sapo.data.prompts.video_budget` reads it when a video is rendered (the processor itself is always called
    with the frames as rendered, `do_resize=False, do_sample_frames=False`).
    """
    from transformers import AutoProcessor

    name = resolve_model_path(path_or_id)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    if trust_remote_code:
        log.warning("loading the processor of %s with trust_remote_code=True", name)
    processor = AutoProcessor.from_pretrained(name, **extra)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError(f"{name}: the processor {type(processor).__name__} has no image processor (not a VLM?)")
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        lo = size.get("shortest_edge") if min_pixels is None else min_pixels
        hi = size.get("longest_edge") if max_pixels is None else max_pixels
        if lo is None or hi is None or not 0 < lo <= hi:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={lo} max_pixels={hi}")
        image_processor.size = {"shortest_edge": int(lo), "longest_edge": int(hi)}
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None:
        size = dict(video_processor.size)
        lo = size.get("shortest_edge") if video_min_pixels is None else video_min_pixels
        hi = size.get("longest_edge") if video_max_pixels is None else video_max_pixels
        if lo is None or hi is None or not 0 < lo <= hi:
            raise ValueError(f"need 0 < video_min_pixels <= video_max_pixels, got {lo} and {hi}")
        video_processor.size = {"shortest_edge": int(lo), "longest_edge": int(hi)}
        if video_max_frames is not None:
            video_processor.max_frames = int(video_max_frames)
        if video_fps is not None:
            video_processor.fps = float(video_fps)
    return processor
