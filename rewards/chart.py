"""Chart QA reward: ChartQA's relaxed accuracy (Masry et al., 2022), the 5% rule of Methani et al. (PlotQA, 2020).

``compute_score`` returns ``accuracy`` (0/1), ``format`` (0/1, see ``rewards.format``) and
``overall = 0.9 * accuracy + 0.1 * format``.

The answer is the last ``<answer>`` block, else the text after the last "Answer:" (the answer line many chart
benchmarks ask for). Then:

- Numbers. A string is numeric when, trimmed, it reads ``[currency] [sign] digits [.digits] [% or unit]``:
  - currency prefixes ``$ € £ ¥`` are dropped, and a unicode minus reads as ``-``;
  - thousands separators are commas between groups of exactly three digits ("12,345.6" reads 12345.6); any other comma
    ("1,2") makes the string text;
  - a trailing ``%`` is dropped, not divided by 100, so "45%" equals "45" (ChartQA labels mostly omit the sign that
    models write); a trailing unit of up to four words of letters is dropped too ("12 kg", "3 years", "1.2M");
    scale words are not applied ("1.2 million" reads 1.2, and does not equal 1200000).
  When the label is numeric, the prediction is right when it is numeric and ``|pred - label| <= 0.05 * |label|`` (a
  label of 0 needs exactly 0). Known flaw, kept for comparability with published numbers: years are numbers too, so
  2019 for 2020 counts as right.
- Anything else: case-insensitive exact match after trimming whitespace, collapsing inner whitespace and dropping one
  trailing period. A label given as a list is matched if any of its items is.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rewards.format import extract_answer, format_ok

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
RELATIVE_TOLERANCE = 0.05
MAX_NUMERIC_CHARS = 64  # longer strings are never read as numbers (and the regex stays cheap)

_NUMBER = re.compile(
    r"[$€£¥]?\s*(?P<sign>[+-]?)\s*[$€£¥]?\s*(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?"
    r"\s*(?:%|[A-Za-z]+(?:\s+[A-Za-z]+){0,3})?"
)


def compute_score(completion: str, ground_truth: Any, **meta: Any) -> dict[str, float]:
    fmt = float(format_ok(completion))
    pred = extract_chart_answer(completion)
    labels = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    acc = float(pred is not None and any(relaxed_match(pred, str(label)) for label in labels))
    return {"overall": ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}


def extract_chart_answer(completion: str) -> str | None:
    answer = extract_answer(completion)
    if answer is not None:
        return answer
    at = completion.rfind("Answer:")
    if at < 0:
        return None
    rest = completion[at + len("Answer:") :].strip()
    return rest.splitlines()[0].strip() if rest else ""


def to_number(text: str) -> float | None:
    text = text.strip().replace("−", "-")
    if not text or len(text) > MAX_NUMERIC_CHARS:
        return None
    match = _NUMBER.fullmatch(text)
    if not match or not (match.group("int") or match.group("frac")):
        return None
    value = float((match.group("int") or "0").replace(",", "") + (match.group("frac") or ""))
    value = -value if match.group("sign") == "-" else value
    return value if math.isfinite(value) else None


def relaxed_match(pred: str, label: str) -> bool:
    pred = pred.strip()
    if not pred:
        return False
    label_value = to_number(label)
    if label_value is not None:
        pred_value = to_number(pred)
        if pred_value is not None:
            if label_value == 0:
                return pred_value == 0
            return abs(pred_value - label_value) <= RELATIVE_TOLERANCE * abs(label_value)
    return _text(pred) == _text(label)


def _text(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    return (text[:-1] if text.endswith(".") else text).strip().lower()
