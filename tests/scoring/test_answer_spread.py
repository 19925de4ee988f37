"""The spread of a task's answers (distinct answers, share of the most common one) and the collapse warning."""

from __future__ import annotations

import logging

import pytest

from vlm_sapo.tasks.answers import COLLAPSE_SHARE, MIN_ANSWERS, answer_key, answer_spread, parse_answers


def test_counts_by_hand() -> None:
    spread = answer_spread(["3", "3", " 3 ", "4", None, "", [1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0)])
    # "3" three times (stripped), "4", two unparsed, one box given twice in two spellings
    assert (spread.count, spread.distinct, spread.top) == (8, 4, "3")
    assert spread.top_share == pytest.approx(3 / 8)
    assert answer_key([1, 2.5, 3, 4]) == "[1, 2.5, 3, 4]" and answer_key(None) == "<none>"
    assert answer_spread([]).count == 0 and not answer_spread([]).collapsed


def test_collapse_needs_a_large_share_of_enough_answers(caplog: pytest.LogCaptureFixture) -> None:
    n_same = int(COLLAPSE_SHARE * MIN_ANSWERS + 0.999)
    collapsed = answer_spread(["4"] * n_same + ["3"] * (MIN_ANSWERS - n_same))
    assert collapsed.collapsed and collapsed.top_share >= COLLAPSE_SHARE
    assert not answer_spread(["4"] * (MIN_ANSWERS - 1)).collapsed  # too few to say
    assert not answer_spread(["4"] * (n_same - 1) + ["3"] * (MIN_ANSWERS - n_same + 1)).collapsed
    from vlm_sapo.tasks.answers import warn_if_collapsed

    with caplog.at_level(logging.WARNING):
        assert warn_if_collapsed(collapsed, "chart", "step 7")
    assert "step 7: task chart's answers collapsed onto '4'" in caplog.text


def test_parse_answers_uses_the_tasks_own_parsers() -> None:
    texts = ["<think></think><answer>3</answer>", "no answer at all", "<answer>[1, 2, 30, 40]</answer>"]
    assert parse_answers("chart", texts[:1]) == ["3"]
    got = answer_spread(parse_answers("grounding", texts))
    assert got.top == "<none>" and got.distinct == 2  # two unparsed completions, one box
