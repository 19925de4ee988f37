"""`rewards.functions[i].label`: two entries of one reward (different kwargs) are told apart by their labels; without
labels the pool refuses them naming the clashing entries and the key that fixes it."""

from __future__ import annotations

import pytest

from vlm_sapo.recipe import RecipeError, validate_recipe
from vlm_sapo.scoring import RewardError, RewardSpec, ScoreItem
from vlm_sapo.scoring.pool import RewardPool

BASE = {"name": "t", "model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl", "task": "math"}]}}


def _specs(functions: list[dict]) -> list[RewardSpec]:
    recipe = validate_recipe({**BASE, "rewards": {"functions": functions}})
    return [RewardSpec.coerce(f) for f in recipe.rewards.functions]


def test_duplicate_rewards_need_labels_and_the_error_names_them():
    same = [{"name": "length_penalty", "kwargs": {"max_chars": 5}},
            {"name": "math", "tasks": ["math"]},
            {"name": "length_penalty", "kwargs": {"max_chars": 50}}]
    with pytest.raises(RewardError) as err:
        RewardPool(_specs(same), workers=1)
    msg = str(err.value)
    assert "label 'length_penalty' is taken by entries [0] `length_penalty`, [2] `length_penalty`" in msg
    assert "labels in use: ['length_penalty', 'math']" in msg and "rewards.functions[i].label" in msg


def test_labels_tell_two_entries_of_one_reward_apart():
    specs = _specs([{"name": "length_penalty", "kwargs": {"max_chars": 5}, "weight": 1.0},
                    {"name": "length_penalty", "kwargs": {"max_chars": 50}, "weight": 0.5, "label": "long"}])
    assert [s.label for s in specs] == [None, "long"]
    pool = RewardPool(specs, workers=1)
    try:
        (result,) = pool.score([ScoreItem("s0", "math", "x" * 20, None, {})])
    finally:
        pool.close()
    # rewards/length_penalty.py: penalty = min(1, max(0, len - max_chars) / max_chars), overall = -penalty
    assert result.scores["length_penalty/penalty"] == 1.0  # (20 - 5) / 5, capped at 1
    assert result.scores["long/penalty"] == 0.0  # 20 <= 50
    assert result.overall == pytest.approx(1.0 * -1.0 + 0.5 * -0.0)


def test_a_label_must_be_one_plain_word():
    with pytest.raises(RecipeError, match=r"rewards\.functions\[0\]\.label"):
        validate_recipe({**BASE, "rewards": {"functions": [{"name": "math", "label": "a/b"}]}})
