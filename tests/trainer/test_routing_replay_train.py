"""`algorithm.routing_replay` in the real trainer (in-process): R2 and R3 on a tiny Qwen3-VL-MoE with the transformers
rollout backend and two updates per rollout batch, and the recipe error on a dense policy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlm_sapo.metrics_log import read_metrics
from vlm_sapo.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smoke_cpu.yaml"
FAST = ["rollout.max_new_tokens=6", "rollout.n=2", "data.prompts_per_step=2", "algorithm.mini_batches=2",
        "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=0", "checkpoint.resume=never",
        "learner.lr=1e-3"]


@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_replay_runs_in_the_trainer(tiny_qwen3_moe_dir: Path, tmp_path: Path, replay: str) -> None:
    from vlm_sapo.trainer import train

    recipe = load_recipe(RECIPE, [f"model.path={tiny_qwen3_moe_dir}", f"logging.dir={tmp_path / 'run'}",
                                  f"algorithm.routing_replay={replay}", "learner.steps=2", *FAST])
    rows = read_metrics(train(recipe))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["routing/bytes_per_token"] == 4.0  # 2 MoE layers x top-2, one byte each
        assert r["routing/learner_index_bytes"] > 0 and math.isfinite(r["routing/replay_overrode_frac"])
        assert 0.0 <= r["routing/replay_overrode_frac"] < 0.5
        # the old-policy pass of step 2 (after updates at lr 1e-3) still matches the rollout: both run on the same
        # weights, and under R3 also with the same experts
        assert r["train/mismatch_logp_abs_diff_max"] < 1e-4
    if replay == "r3":  # the rollout's indices: (prompt + completion - 1) tokens x 4 bytes per completion
        assert all(r["routing/rollout_index_bytes"] > 0 for r in rows)
    else:
        assert all(r["routing/rollout_index_bytes"] == 0 for r in rows)


def test_replay_on_a_dense_policy_is_a_recipe_error(tiny_qwen25_dir: Path, tmp_path: Path) -> None:
    from vlm_sapo.trainer import Trainer

    recipe = load_recipe(RECIPE, [f"model.path={tiny_qwen25_dir}", f"logging.dir={tmp_path / 'run'}",
                                  "algorithm.routing_replay=r2", *FAST])
    with pytest.raises(RecipeError, match=r"`algorithm.routing_replay: r2` needs a mixture-of-experts policy, but "
                                          r"`model.path` \(.*\) is a dense qwen2_5_vl model"):
        Trainer(recipe)
