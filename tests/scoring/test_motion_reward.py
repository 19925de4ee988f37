"""The motion reward (video task): exact direction words, the format bonus, no credit for hedges or empty answers."""

from __future__ import annotations

import pytest

from rewards.motion import compute_score


@pytest.mark.parametrize(("completion", "gold", "acc", "fmt"), [
    ("<think>moves to the right</think><answer>right</answer>", "right", 1.0, 1.0),
    ("<think></think><answer> Left. </answer>", "left", 1.0, 1.0),
    ("<answer>up</answer>", "up", 1.0, 0.0),  # right, but no think block
    ("<think></think><answer>to the left</answer>", "left", 0.0, 1.0),
    ("<think></think><answer>left or right</answer>", "left", 0.0, 1.0),
    ("<think></think><answer>down</answer>", "up", 0.0, 1.0),
    ("<think></think><answer></answer>", "up", 0.0, 0.0),
    ("up", "up", 0.0, 0.0),  # no answer block
    ("<think></think><answer>sideways</answer>", "sideways", 0.0, 1.0),  # not a direction: never right
])
def test_scores(completion, gold, acc, fmt):
    assert compute_score(completion, gold) == {"overall": pytest.approx(0.9 * acc + 0.1 * fmt), "accuracy": acc,
                                               "format": fmt}
