"""Property-based fuzzing of every answer parser and reward a completion reaches (math, chart, grounding box, format,
MathVista): arbitrary unicode, tag soup, huge numbers and exponents, megabyte strings, braces nested 10,000 deep.

Properties, per call: no exception, a result of the documented shape (scores finite and in [0, 1]), at most
`PER_CALL_S` seconds (`SYMBOLIC_S` where math-verify runs), and no code from the completion ever runs (payloads that
would create a marker file if evaluated by Python, sympy's `parse_expr` or a shell are mixed in everywhere).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rewards import chart, grounding, mathvista_reward
from rewards import format as format_reward
from rewards import math as math_reward

PER_CALL_S = 2.0  # text handling, linear in the completion's length (1 MB: ~0.05 s measured)
SYMBOLIC_S = 10.0  # math-verify's parse, parse and verify, each under its own 3 s alarm (slowest measured: 0.7 s)
MARKER = Path(f"/tmp/vlm_sapo_fuzz_pwned_{uuid.uuid4().hex}")
PAYLOADS = [
    f"__import__('os').system('touch {MARKER}')",
    f"exec(\"open('{MARKER}', 'w')\")",
    f"$(touch {MARKER})",
    f"`touch {MARKER}`",
    f"\\boxed{{__import__('os').system('touch {MARKER}')}}",
    f"Symbol('x').__class__.__mro__[-1].__subclasses__() or open('{MARKER}', 'w')",
]
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "(", ")", "[", "]", ",", ".", "-",
             "^", "^{", "\\frac{", "\\sqrt{", "\\pi", "e", "E", "%", "$", "€", "−", "!", "Answer:", "\n", " ",
             "<|box_start|>", "<|box_end|>", '"bbox_2d": [', "1", "0", "9", "42", "3.14", "1e308", "1e999", "nan",
             "inf",
             "A", "(B)", "C.", "°", "π", "√", "²", "，", "x", "\\left(", "\\right)", "\\infty", "1/0", "\x00",
             "\ud800", "🙂", "\u202e", "\u0301", *PAYLOADS]

# huge exponents, towers, factorials, nesting, megabytes: each deterministic and each given to every parser
HOSTILE = [
    "9^9^9^9^9", "\\boxed{9^{9^{9^{9}}}}", "10^{10^{10}}", "2^{99999999}", "1e99999999", "99999!",
    "-" * 100_000 + "1", "{" * 10_000 + "1" + "}" * 10_000, "\\boxed{" * 10_000 + "}" * 10_000,
    "(" * 10_000 + "5" + ")" * 10_000, "[" * 10_000, "7" * 1_000_000, "<answer>" * 100_000, "a" * 1_000_000,
    "<think>x</think><answer>" + "1," * 500_000 + "</answer>", "\\frac{" * 5000 + "1" + "}{2}" * 5000,
    '[{"bbox_2d": [' + "9" * 100_000 + ", 1, 2, 3]}]",
]

text_soup = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=40).map("".join)
repeated = st.builds(lambda frag, n: frag * n, st.sampled_from(FRAGMENTS), st.integers(1, 20_000))
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True)).map(str)
wrapped = st.builds(lambda body, tag: f"<think>.</think><answer>{body}</answer>" if tag else f"\\boxed{{{body}}}",
                    st.one_of(text_soup, numbers, st.sampled_from(PAYLOADS)), st.booleans())
completions = st.one_of(st.text(), text_soup, repeated, numbers, wrapped, st.sampled_from(HOSTILE))

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                       HealthCheck.function_scoped_fixture])
CHOICES = ["3", "5", "\\frac{10}{2}", "7 cm"]
BOX_META = {"coord_system": "abs_resized", "image_size": (640, 480), "model_input_size": (448, 336)}


def _timed(fn: Any, *args: Any, limit: float = PER_CALL_S, **kwargs: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"{fn.__module__}.{fn.__name__} took {elapsed:.1f} s on {str(args[0])[:60]!r}"
    return out


def _check_scores(scores: dict[str, float], keys: set[str]) -> None:
    assert set(scores) == keys, scores
    for key, value in scores.items():
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)


@pytest.fixture(scope="module", autouse=True)
def no_code_ran():
    yield
    assert not MARKER.exists(), "a parser executed code taken from a completion"


@FUZZ
@given(completions)
@example("".join(HOSTILE))
def test_format_parsers(tally: Counter, completion: str) -> None:
    tally["bad_inputs"] += 1
    assert isinstance(_timed(format_reward.format_ok, completion), bool)
    answer = _timed(format_reward.extract_answer, completion)
    assert answer is None or (isinstance(answer, str) and answer in completion)
    boxed = _timed(format_reward.last_boxed, completion)
    assert boxed is None or (isinstance(boxed, str) and boxed in completion)
    _check_scores(_timed(format_reward.compute_score, completion), {"overall", "format"})


@FUZZ
@given(completions, st.one_of(numbers, st.sampled_from(["B", "(C)", "\\frac{1}{2}", "2\\sqrt{3}", ""]), text_soup),
       st.sampled_from([None, CHOICES]))
def test_math_reward(tally: Counter, completion: str, gold: str, choices: list[str] | None) -> None:
    tally["bad_inputs"] += 1
    scores = _timed(math_reward.compute_score, completion, gold, choices=choices, limit=SYMBOLIC_S)
    _check_scores(scores, {"overall", "accuracy", "format"})
    pred = _timed(math_reward.extract_math_answer, completion)
    assert pred is None or isinstance(pred, str)
    if pred is not None and len(pred) <= 100_000:  # the answer compared with itself is always right
        assert _timed(math_reward.is_correct, pred, pred, limit=SYMBOLIC_S) == bool(pred.strip())
    assert isinstance(_timed(math_reward.parse_options, completion[:10_000]), dict)


@FUZZ
@given(completions, st.one_of(numbers, text_soup, st.lists(numbers, max_size=3)))
def test_chart_reward(tally: Counter, completion: str, label: Any) -> None:
    tally["bad_inputs"] += 1
    _check_scores(_timed(chart.compute_score, completion, label), {"overall", "accuracy", "format"})
    for text in (completion, completion[-100:]):
        value = _timed(chart.to_number, text)
        assert value is None or (isinstance(value, float) and math.isfinite(value))
        assert isinstance(_timed(chart.relaxed_match, text, str(label)), bool)


@FUZZ
@given(completions, st.sampled_from(["abs_resized", "rel1000", "abs_original"]))
def test_grounding_reward(tally: Counter, completion: str, coord_system: str) -> None:
    tally["bad_inputs"] += 1
    box = _timed(grounding.parse_box, completion)
    assert box is None or (len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box))
    meta = {**BOX_META, "coord_system": coord_system}
    scores = _timed(grounding.compute_score, completion, [10, 20, 300, 400], **meta)
    _check_scores(scores, {"overall", "accuracy", "iou", "format"})


@FUZZ
@given(completions, st.sampled_from([("multi_choice", None), ("free_form", "integer"), ("free_form", "float"),
                                     ("free_form", "text"), ("free_form", "list")]),
       st.one_of(st.none(), st.integers(-5, 5), st.just("nan"), st.just("1e999")))
def test_mathvista_reward(tally: Counter, completion: str, kind: tuple[str, str | None], precision: Any) -> None:
    tally["bad_inputs"] += 1
    question_type, answer_type = kind
    scores = _timed(mathvista_reward.compute_score, completion, "5", question_type=question_type,
                    answer_type=answer_type, choices=CHOICES, precision=precision, unit="cm")
    _check_scores(scores, {"overall", "accuracy", "format"})
