"""MathVista's scoring rule (Lu et al., ICLR 2024; `evaluation/calculate_score.py` of lupantech/MathVista) as a reward.

A plain reward file (it imports only ``rewards``): the built-in reward ``mathvista_reward``, the ``mathvista`` task's.
It returns ``accuracy`` (0/1), ``format`` (0/1) and ``overall = 0.9 * accuracy + 0.1 * format``, like ``rewards.math``.

The authors extract the answer with an LLM, then normalise it by the question's type and compare strings. Here the
answer is what the math task extracts (last ``<answer>`` block, a ``\\boxed{}`` inside it wins), then:

- ``multi_choice`` (gold = the text of the right choice): a letter picks its choice -- "(B)" anywhere, or the whole
  answer "B", or a leading "B." / "B)" / "B:" (the letter an LLM extractor would return); any other text picks the
  choice at the smallest Levenshtein distance (their ``get_most_similar``). Right when the picked choice equals the gold.
- ``free_form``: ``integer``: ``str(int(float(pred)))``; ``float``: ``str(round(float(pred), int(precision)))``;
  ``list`` and ``text``: the text itself; then stripped-string equality with the gold answer. Before ``float()`` a
  trailing unit (meta ``unit``), ``$`` signs and thousands commas are removed, which their extractor would also drop.

Deviations, on purpose: an empty answer scores 0 (their script maps it to the nearest choice), and a multiple-choice
answer over 1,000 characters is not compared by edit distance (scored 0), to bound the cost. ``float()`` parses numbers
only; nothing is ever evaluated.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.format import format_ok
from rewards.math import extract_math_answer

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
MAX_EDIT_CHARS = 1000

_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")
_LEADING_LETTER = re.compile(r"([A-Z])\s*[.):]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def compute_score(completion: str, ground_truth: Any, *, question_type: str | None = None,
                  answer_type: str | None = None, choices: list | None = None, precision: Any = None,
                  unit: str | None = None, **meta: Any) -> dict[str, float]:
    if question_type not in ("multi_choice", "free_form"):
        raise ValueError(f"mathvista reward: meta['question_type'] must be 'multi_choice' or 'free_form', "
                         f"got {question_type!r}")
    fmt = float(format_ok(completion))
    pred = extract_math_answer(completion)
    normalized = normalize_answer(pred, question_type, answer_type, choices, precision, unit) if pred else None
    acc = float(normalized is not None and normalized.strip() == str(ground_truth).strip())
    return {"overall": ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}


def normalize_answer(pred: str, question_type: str, answer_type: str | None, choices: list | None, precision: Any,
                     unit: str | None = None) -> str | None:
    """The authors' `normalize_extracted_answer`, for an answer already extracted; None when it cannot be read."""
    pred = pred.strip()
    if question_type == "multi_choice":
        if not choices:
            raise ValueError("mathvista reward: a multi_choice question needs meta['choices']")
        options = [str(c) for c in choices]
        letters = [chr(ord("A") + i) for i in range(len(options))]
        found = _PAREN_LETTER.findall(pred)
        letter = found[0].upper() if found else pred
        if letter not in letters:
            lead = _LEADING_LETTER.match(pred)
            letter = lead.group(1) if lead else letter
        if letter in letters:
            return options[letters.index(letter)]
        if len(pred) > MAX_EDIT_CHARS:
            return None
        distances = [levenshtein(pred, option) for option in options]
        return options[distances.index(min(distances))]
    if answer_type in ("integer", "float"):
        number = _number(pred, unit)
        if number is None:
            return None
        try:
            if answer_type == "integer":
                return str(int(number))
            return str(round(number, int(float(precision))))
        except (ValueError, OverflowError, TypeError):  # inf, nan, or a missing/NaN precision
            return None
    return pred


def _number(text: str, unit: str | None) -> float | None:
    text = text.replace("$", "").strip()
    if unit and text.endswith(unit.strip()):
        text = text[: -len(unit.strip())].strip()
    text = _THOUSANDS.sub("", text)
    try:
        return float(text)
    except ValueError:
        return None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
