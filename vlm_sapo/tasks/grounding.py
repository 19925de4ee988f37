"""Grounding task (phrase -> box), scored by ``rewards.grounding`` (IoU; Acc@0.5).

Qwen-VL families answer boxes in different units, so the model family picks the coordinate system and the trainer
puts it in each sample's meta (``coord_system``), with ``model_input_size`` (the processor's resized width, height).
"""

from __future__ import annotations

from typing import Any

from rewards.grounding import COORD_SYSTEMS, parse_box
from vlm_sapo.tasks.task import FORMAT_INSTRUCTION, Task

_FAMILY_COORDS = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs_resized", "qwen3_vl": "rel1000"}


def coord_system_for_family(family: str) -> str:
    """Qwen2-VL and Qwen3-VL answer in 0-1000 units of the image; Qwen2.5-VL in pixels of its resized input.
    Accepts model_type spellings ("qwen2_5_vl", "Qwen2.5-VL", "qwen3_vl_moe")."""
    key = family.lower().replace("-", "_").replace(".", "_")
    for prefix, coords in sorted(_FAMILY_COORDS.items(), key=lambda kv: -len(kv[0])):
        if key == prefix or key.startswith(prefix + "_"):
            return coords
    raise ValueError(
        f"no grounding coordinate system known for model family {family!r} (known: {', '.join(_FAMILY_COORDS)})"
    )


_UNITS = {
    "rel1000": "integers from 0 to 1000 relative to the image width and height (0,0 is the top-left corner)",
    "abs_resized": "pixels of the image as you see it (0,0 is the top-left corner)",
    "abs_original": "pixels of the original image (0,0 is the top-left corner)",
}


def grounding_instruction(sample: Any) -> str:
    coords = (sample.meta or {}).get("coord_system")
    if coords not in COORD_SYSTEMS:
        raise ValueError(
            f"sample {getattr(sample, 'id', '?')}: grounding needs meta['coord_system'] in {COORD_SYSTEMS} "
            "(set it from the model family with coord_system_for_family)"
        )
    return (
        "Locate the object described above. Give its bounding box as [x1, y1, x2, y2] (top-left and bottom-right "
        f"corners) in {_UNITS[coords]}. {FORMAT_INSTRUCTION} For example: <answer>[120, 64, 388, 301]</answer>."
    )


GROUNDING = Task(
    name="grounding", reward_name="grounding", instruction_for=grounding_instruction, parse_answer=parse_box
)
