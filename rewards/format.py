"""Format reward, and the answer extraction every built-in reward shares.

A completion is well formed when it is ``<think>...</think>`` then ``<answer>...</answer>``, each tag exactly once, in
that order, with only whitespace before, between and after, and a non-empty answer. The answer must be non-empty so
that the format reward never pays for a completion that commits to nothing; the thinking may be empty.

``compute_score`` returns ``{"overall": f, "format": f}`` with ``f`` 0 or 1. It has no ``accuracy``: there is no ground
truth to be accurate about, and a ``format/accuracy`` curve in the logs would only mislead.
"""

from __future__ import annotations

import re
from typing import Any

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_WELL_FORMED = re.compile(r"\s*<think>.*</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def format_ok(completion: str) -> bool:
    if any(completion.count(tag) != 1 for tag in _TAGS):  # one of each, so the greedy groups below cannot overreach
        return False
    match = _WELL_FORMED.fullmatch(completion)
    return bool(match and match.group(1).strip())


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last ``<answer>...</answer>`` block, or None when there is none."""
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>") : end].strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None. Linear in the text's length."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: no answer rather than a guess


def compute_score(completion: str, ground_truth: Any = None, **meta: Any) -> dict[str, float]:
    ok = float(format_ok(completion))
    return {"overall": ok, "format": ok}
