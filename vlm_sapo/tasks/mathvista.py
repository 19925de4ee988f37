"""MathVista task: the math task's prompts and answer parser, scored by ``rewards.mathvista_reward`` (MathVista's own
answer-type and precision rules)."""

from __future__ import annotations

from typing import Any

from vlm_sapo.tasks.math import MATH, math_instruction
from vlm_sapo.tasks.task import Task


def mathvista_instruction(sample: Any) -> str:
    """Multiple choice: the math task's lettered choices. Free form: MathVista's own answer-type hint (from its
    `query` prompts), then the project's format instruction."""
    meta = sample.meta or {}
    if meta.get("question_type") == "multi_choice":
        return math_instruction(sample)
    answer_type, precision = meta.get("answer_type"), meta.get("precision")
    if answer_type == "integer":
        hint = "The answer is an integer, e.g. 1, 2, 3."
    elif answer_type == "float" and precision is not None and precision == precision:  # not NaN
        places = int(float(precision))
        hint = f"The answer is a floating-point number with {places} decimal place{'s' * (places != 1)}."
    elif answer_type == "list":
        hint = "The answer is a Python list, e.g. [1, 2, 3]."
    else:
        hint = ""
    return " ".join(p for p in (hint, math_instruction(sample)) if p)


MATHVISTA = Task(name="mathvista", reward_name="mathvista_reward", instruction_for=mathvista_instruction,
                 parse_answer=MATH.parse_answer)
