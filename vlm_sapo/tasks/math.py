"""Math task: Geometry3K, We-Math and free-form answers, scored by ``rewards.math`` (math-verify)."""

from __future__ import annotations

from typing import Any

from rewards.math import choice_map, extract_math_answer
from vlm_sapo.tasks.task import FORMAT_INSTRUCTION, Task


def math_instruction(sample: Any) -> str:
    """Lists the choices (from meta ``choices`` or ``options``) when there are any, then the answer format."""
    meta = sample.meta or {}
    choices = choice_map(meta.get("choices"), meta.get("options"))
    if not choices:
        return f"{FORMAT_INSTRUCTION} For example: <answer>\\frac{{3}}{{4}}</answer>."
    listed = "\n".join(f"{letter}. {value}" for letter, value in choices.items())
    return f"Choices:\n{listed}\n{FORMAT_INSTRUCTION} Answer with the letter of the correct choice, e.g. <answer>B</answer>."


MATH = Task(name="math", reward_name="math", instruction_for=math_instruction, parse_answer=extract_math_answer)
