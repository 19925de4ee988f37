"""Grounding reward: IoU of the predicted box with the labelled one, in the original image's pixels.

``compute_score`` returns ``iou`` (in [0, 1]), ``accuracy`` (IoU >= 0.5, the RefCOCO metric), ``format`` (0/1, see
``rewards.format``) and ``overall = 0.9 * iou + 0.1 * format``: the continuous IoU gives RL a denser signal than the
0/1 metric, which stays the benchmark number.

The box is read from the last ``<answer>`` block, or from the whole completion when there is none, in the first of
these forms found: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, Qwen's JSON ``"bbox_2d": [x1, y1, x2, y2]``, or a bare
``[x1, y1, x2, y2]`` / ``(x1, y1, x2, y2)``. Several boxes: the first one counts.

Coordinates (meta ``coord_system``; Qwen-VL families answer in different units, see
``vlm_sapo.tasks.coord_system_for_family``):
- ``abs_resized``: pixels of the image the model saw (Qwen2.5-VL), scaled by ``image_size / model_input_size``;
- ``rel1000``: 0-1000 of the image's width and height (Qwen2-VL, Qwen3-VL);
- ``abs_original``: pixels of the original image.
Meta also gives ``image_size`` (original width, height; or ``image_width`` and ``image_height``) and, for
``abs_resized``, ``model_input_size`` (width, height after the processor's resize). A missing or bad key raises a
``ValueError`` naming it: a silent guess would score every sample wrongly. A degenerate box (x2 <= x1 or y2 <= y1) scores
0; a box reaching outside the image is clipped to it first.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rewards.format import extract_answer, format_ok

IOU_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
COORD_SYSTEMS = ("abs_resized", "rel1000", "abs_original")

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_PATTERNS = (
    re.compile(rf"<\|box_start\|>\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*<\|box_end\|>"),
    re.compile(rf"\"bbox_2d\"\s*:\s*\[{_NUM},{_NUM},{_NUM},{_NUM}\]"),
    re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]"),
    re.compile(rf"\({_NUM},{_NUM},{_NUM},{_NUM}\)"),
)

Box = tuple[float, float, float, float]


def compute_score(
    completion: str,
    ground_truth: Any,
    *,
    coord_system: str | None = None,
    image_size: Any = None,
    model_input_size: Any = None,
    image_width: Any = None,
    image_height: Any = None,
    **meta: Any,
) -> dict[str, float]:
    size = _size(image_size if image_size is not None else _pair_or_none(image_width, image_height), "image_size")
    gold = _gold_box(ground_truth)
    fmt = float(format_ok(completion))
    if coord_system not in COORD_SYSTEMS:
        raise ValueError(f"grounding reward: meta['coord_system'] must be one of {COORD_SYSTEMS}, got {coord_system!r}")
    input_size = _size(model_input_size, "model_input_size") if coord_system == "abs_resized" else None
    pred = parse_box(completion)
    iou = 0.0
    if pred is not None:
        box = clip_box(to_original(pred, coord_system, size, input_size), size)
        iou = box_iou(box, gold) if box is not None else 0.0
    return {"overall": IOU_WEIGHT * iou + FORMAT_WEIGHT * fmt, "accuracy": float(iou >= 0.5), "iou": iou, "format": fmt}


def parse_box(completion: str) -> Box | None:
    answer = extract_answer(completion)
    text = completion if answer is None else answer
    for pattern in _BOX_PATTERNS:
        match = pattern.search(text)
        if match:
            box = tuple(float(v) for v in match.groups())
            return box if all(math.isfinite(v) for v in box) else None  # type: ignore[return-value]
    return None


def to_original(box: Box, coord_system: str, image_size: tuple[float, float], input_size: tuple[float, float] | None):
    width, height = image_size
    if coord_system == "abs_original":
        sx = sy = 1.0
    elif coord_system == "rel1000":
        sx, sy = width / 1000.0, height / 1000.0
    elif coord_system == "abs_resized":
        assert input_size is not None
        sx, sy = width / input_size[0], height / input_size[1]
    else:
        raise ValueError(f"unknown coord_system {coord_system!r} (valid: {', '.join(COORD_SYSTEMS)})")
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def clip_box(box: Box, image_size: tuple[float, float]) -> Box | None:
    """The box clipped to the image, or None when it is degenerate or lies wholly outside."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None
    width, height = image_size
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def box_iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pair_or_none(a: Any, b: Any) -> Any:
    return None if a is None or b is None else (a, b)


def _size(value: Any, key: str) -> tuple[float, float]:
    try:
        width, height = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"grounding reward: meta['{key}'] must be (width, height), got {value!r}") from None
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"grounding reward: meta['{key}'] must be positive, got {value!r}")
    return width, height


def _gold_box(value: Any) -> Box:
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"grounding reward: the ground truth must be [x1, y1, x2, y2], got {value!r}") from None
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"grounding reward: the ground-truth box {value!r} is empty")
    return (x1, y1, x2, y2)
