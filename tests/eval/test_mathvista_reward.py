"""MathVista's scoring rule, case by case, with the expected outcome of the authors' normalisation written out."""

from __future__ import annotations

import pytest

from rewards.mathvista_reward import compute_score, levenshtein
from tests.eval.eval_helpers import as_model

MC = dict(question_type="multi_choice", answer_type="text", choices=["3 cm", "5 cm", "7 cm"])


@pytest.mark.parametrize("answer,right", [
    ("B", True), ("(B)", True), ("(b) 5 cm", True), ("B. 5 cm", True), ("\\boxed{B}", True),
    ("5 cm", True), ("5cm", True),  # nearest choice by edit distance
    ("C", False), ("7", False), ("D", False),  # D is not a choice here: nearest text is "3 cm"
])
def test_multiple_choice(answer, right):
    assert compute_score(as_model(answer), "5 cm", **MC)["accuracy"] == float(right)


@pytest.mark.parametrize("answer,answer_type,precision,gold,right", [
    ("12", "integer", None, "12", True), ("12.0", "integer", None, "12", True),
    ("12.7", "integer", None, "12", True),  # int(float(x)) truncates, as the authors' script does
    ("1,200", "integer", None, "1200", True), ("13", "integer", None, "12", False), ("twelve", "integer", None, "12", False),
    ("1.449", "float", 2.0, "1.45", True), ("1.45", "float", 2.0, "1.45", True), ("1.4", "float", 2.0, "1.45", False),
    ("0.5", "float", 1.0, "0.5", True), ("$3.20", "float", 2.0, "3.2", True),
    ("3.1", "float", None, "3.1", False),  # a float question without precision cannot be normalised
    ("[1, 2, 3]", "list", None, "[1, 2, 3]", True), ("[1,2,3]", "list", None, "[1, 2, 3]", False),
    ("inf", "integer", None, "0", False),
])
def test_free_form(answer, answer_type, precision, gold, right):
    out = compute_score(as_model(answer), gold, question_type="free_form", answer_type=answer_type,
                        precision=precision, choices=None)
    assert out["accuracy"] == float(right)
    assert out["overall"] == pytest.approx(0.9 * float(right) + 0.1)


def test_units_empty_answers_and_missing_keys():
    assert compute_score(as_model("45 degrees"), "45", question_type="free_form", answer_type="integer",
                         unit="degrees")["accuracy"] == 1.0
    assert compute_score("<think>x</think><answer></answer>", "3 cm", **MC)["accuracy"] == 0.0  # no free nearest
    assert compute_score("no tags at all", "3 cm", **MC) == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    with pytest.raises(ValueError, match="question_type"):
        compute_score(as_model("B"), "5 cm", choices=["3", "5"])


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
