"""Motion reward: which way the shape in a video moves (the synthetic `motion` task): left, right, up or down.

``compute_score`` returns ``accuracy`` (0/1), ``format`` (0/1, see ``rewards.format``) and
``overall = 0.9 * accuracy + 0.1 * format``. The answer is the last ``<answer>`` block, lower-cased, with surrounding
whitespace and one trailing period removed; it must be exactly the direction word ("left", not "to the left"), so a
hedge that names two directions never scores.
"""

from __future__ import annotations

from typing import Any

from rewards.format import extract_answer, format_ok

DIRECTIONS = ("left", "right", "up", "down")
ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1


def extract_direction(completion: str) -> str | None:
    """The normalised answer text (a direction word when the model gave one), or None without an answer block."""
    answer = extract_answer(completion)
    if answer is None:
        return None
    text = answer.strip().lower()
    return text[:-1].strip() if text.endswith(".") else text


def compute_score(completion: str, ground_truth: Any, **meta: Any) -> dict[str, float]:
    fmt = float(format_ok(completion))
    gold = str(ground_truth).strip().lower()
    pred = extract_direction(completion)
    acc = float(gold in DIRECTIONS and pred == gold)
    return {"overall": ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}
