"""Motion task (video): which way does the shape move across the frames? Scored by ``rewards.motion``."""

from __future__ import annotations

from typing import Any

from rewards.motion import extract_direction
from vlm_sapo.tasks.task import FORMAT_INSTRUCTION, Task


def motion_instruction(sample: Any) -> str:
    return f"{FORMAT_INSTRUCTION} The answer is one word: left, right, up or down, e.g. <answer>left</answer>."


MOTION = Task(name="motion", reward_name="motion", instruction_for=motion_instruction,
              parse_answer=extract_direction)
