"""Math reward: math-verify equivalence, and multiple-choice letters (Geometry3K, We-Math).

``compute_score`` returns ``accuracy`` (0/1), ``format`` (0/1, see ``rewards.format``) and
``overall = 0.9 * accuracy + 0.1 * format``, EasyR1's weighting: correctness dominates, form is a small nudge.

The answer is the last ``<answer>`` block (a ``\\boxed{}`` inside it wins), else the last ``\\boxed{}`` of the
completion; an empty answer scores 0. Multiple choice, when the sample's meta has ``choices`` (a list, letters A, B, ...
in order) or ``options`` (one string, "A. 3; B. 5; ...") and the ground truth is a letter: the model may answer with the
letter, upper case ("B", "(B)", "B.", "B. 5" -- the letter decides, whatever follows it) or with the choice's value
("5", "5 cm", "\\frac{10}{2}").

Safety: model output is never evaluated as code. Only math-verify's LaTeX parser (latex2sympy's ANTLR grammar) reads
it, never ``sympify``/``parse_expr``. Inputs that make that parser or sympy blow up (nesting deeper than 8, power towers,
exponents of 5+ digits, factorials of 4+ digits, answers over 256 characters) skip the symbolic check and are compared
as text only. math-verify's own time-out uses ``signal.alarm``: it is used on the main thread (the reward pool runs each
reward on its worker's main thread) and switched off elsewhere, where the pool's hard time limit still applies.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify

from rewards.format import extract_answer, format_ok, last_boxed

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
MAX_SYMBOLIC_CHARS = 256
MAX_NESTING = 8
SYMBOLIC_TIMEOUT_S = 3  # math-verify's per-call alarm, main thread only

_LETTERS = "ABCDEFGH"
_LETTER_ANSWER = re.compile(r"\(?([A-H])\)?(?:[.:)]|\s|$)")
_UNICODE_TO_LATEX = {
    "°": "^{\\circ}",
    "π": "\\pi ",
    "√": "\\sqrt ",
    "×": "\\times ",
    "÷": "\\div ",
    "−": "-",
    "²": "^{2}",
    "³": "^{3}",
    "，": ",",
    "（": "(",
    "）": ")",
    "：": ":",
}
# a power whose exponent holds, or is followed by, another power: 9^9^9, 9^{9^9}, 9^{9}^{9}
_TOWER = re.compile(r"\^\s*(?:\{[^{}]*\^|\{[^{}]*\}\s*\^|[\w.\\]+\s*\}?\s*\^)")
_BIG_EXPONENT = re.compile(r"\^\s*\{?\s*\d{5,}")
_BIG_FACTORIAL = re.compile(r"\d{4,}\s*!")
_LATEX = [LatexExtractionConfig(boxed_match_priority=0)]


def compute_score(
    completion: str, ground_truth: Any, *, choices: list | None = None, options: str | None = None, **meta: Any
) -> dict[str, float]:
    fmt = float(format_ok(completion))
    pred = extract_math_answer(completion)
    acc = float(pred is not None and is_correct(pred, ground_truth, choice_map(choices, options)))
    return {"overall": ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}


def extract_math_answer(completion: str) -> str | None:
    answer = extract_answer(completion)
    if answer is None:
        return last_boxed(completion)
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer


def choice_map(choices: list | None = None, options: str | None = None) -> dict[str, str] | None:
    """Letter -> choice text, from a ``choices`` list or a We-Math ``options`` string; None when neither is given."""
    if choices:
        return {_LETTERS[i]: str(c) for i, c in enumerate(choices[: len(_LETTERS)])}
    if options:
        return parse_options(options)
    return None


def parse_options(options: str) -> dict[str, str]:
    """Split "A. 3; B. 5;C. 7" into letters. Letters are searched in order (A, then B, ...), and a separator needs a
    ';' before the letter and no ';' right after its dot, so values holding ';' ("①; ③") or ";E.;" stay whole."""
    out: dict[str, str] = {}
    first = re.match(r"\s*A\.\s*", options)
    if not first:
        return out
    pos, letter_index = first.end(), 0
    while True:
        letter = _LETTERS[letter_index]
        nxt = None
        if letter_index + 1 < len(_LETTERS):
            nxt = re.compile(rf";\s*{_LETTERS[letter_index + 1]}\.(?!;)\s*").search(options, pos)
        out[letter] = options[pos : nxt.start() if nxt else len(options)].strip().rstrip(";").strip()
        if nxt is None:
            return out
        pos, letter_index = nxt.end(), letter_index + 1


def is_correct(pred: str, ground_truth: Any, choices: dict[str, str] | None = None) -> bool:
    pred = pred.strip()
    if not pred:
        return False
    gold = str(ground_truth).strip()
    gold_letter = _letter_of(gold)
    if gold_letter is not None and (choices is not None or len(gold) <= 3):
        letter = _letter_of(pred)
        if letter is not None:
            return letter == gold_letter
        if not choices:
            return False
        return any(letter == gold_letter for letter, value in choices.items() if same_value(pred, value))
    return same_value(pred, gold)


def same_value(pred: str, gold: str) -> bool:
    """Equal as normalised text, or equivalent by math-verify (fractions, decimals, radicals, pi, units)."""
    if _plain(pred) == _plain(gold):
        return True
    return symbolic_equal(pred, gold)


def symbolic_equal(pred: str, gold: str) -> bool:
    pred_latex, gold_latex = _to_latex(pred), _to_latex(gold)
    if not (_safe_to_parse(pred_latex) and _safe_to_parse(gold_latex)):
        return False
    timeout = SYMBOLIC_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold_latex}$", _LATEX, fallback_mode="no_fallback", parsing_timeout=timeout)
    pred_parsed = parse(f"${pred_latex}$", _LATEX, fallback_mode="no_fallback", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _letter_of(text: str) -> str | None:
    match = _LETTER_ANSWER.match(text.strip())
    return match.group(1) if match else None


def _plain(text: str) -> str:
    text = text.replace("\\$", "").replace("$", "")
    for src, dst in _UNICODE_TO_LATEX.items():
        if src in "，（）：−":
            text = text.replace(src, dst)
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def _to_latex(text: str) -> str:
    text = text.strip().replace("\\$", "").replace("$", "")  # math-mode delimiters, and \$ as a currency sign
    for wrapper in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(wrapper[0]) and text.endswith(wrapper[1]):
            text = text[2:-2]
    for src, dst in _UNICODE_TO_LATEX.items():
        text = text.replace(src, dst)
    return text.strip().rstrip(".")


def _safe_to_parse(latex: str) -> bool:
    if not latex or len(latex) > MAX_SYMBOLIC_CHARS:
        return False
    depth = deepest = 0
    for ch in latex:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth -= 1
    if deepest > MAX_NESTING:
        return False
    return not (_TOWER.search(latex) or _BIG_EXPONENT.search(latex) or _BIG_FACTORIAL.search(latex))
