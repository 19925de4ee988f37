"""A checkpoint resumes only under the recipe it was written with: a changed reward is refused (naming the keys and
the two ways out), allowed changes (learner.steps, checkpoint.*, eval.*, logging.*) resume, `--resume force` resumes
anyway."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.reliability.reliability_helpers import FAST, TRAIN, metrics, run, run_env, steps
from vlm_sapo.resume_guard import (
    RESUMABLE_CHANGES,
    ResumeRefused,
    check_resume,
    flatten,
    recipe_differences,
    resumable,
)

NEW_REWARD = "rewards.functions=[{name: format}]"


def _cmd(run_dir: Path, model: Path, *extra: str) -> list[str]:
    return [*TRAIN, f"model.path={model}", f"logging.dir={run_dir}", *FAST, "checkpoint.every_steps=1", *extra]


def test_differences_are_dotted_keys_and_the_allow_list_has_reasons():
    saved = {"learner": {"steps": 1, "lr": 1e-4}, "rewards": {"functions": []},
             "data": {"train": [{"path": "a", "task": "math"}]}, "eval": {"benchmarks": []}}
    now = {"learner": {"steps": 5, "lr": 1e-4}, "rewards": {"functions": [{"name": "format"}]},
           "data": {"train": [{"path": "b", "task": "math"}, {"path": "c", "task": "chart"}]},
           "eval": {"benchmarks": ["geometry3k"]}}
    assert flatten(now)["data.train[1].task"] == "chart"
    diffs = recipe_differences(saved, now)
    assert [k for k, _, _ in diffs] == ["data.train[0].path", "data.train[1].path", "data.train[1].task",
                                        "eval.benchmarks", "learner.steps", "rewards.functions",
                                        "rewards.functions[0].name"]
    assert diffs[1] == ("data.train[1].path", "<absent>", "c")
    assert [k for k, _, _ in diffs if not resumable(k)] == [
        "data.train[0].path", "data.train[1].path", "data.train[1].task", "rewards.functions",
        "rewards.functions[0].name"]
    assert all(len(reason) > 20 for reason in RESUMABLE_CHANGES.values())


def test_the_refusal_names_both_ways_out(tmp_path: Path):
    ckpt = tmp_path / "step_3"
    ckpt.mkdir()
    saved = {"name": "a", "seed": 0, "logging": {"dir": "runs/{name}"}, "learner": {"steps": 3}}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "recipe": saved}))
    assert check_resume(ckpt, {**saved, "learner": {"steps": 9}}) == []
    with pytest.raises(ResumeRefused) as err:
        check_resume(ckpt, {**saved, "seed": 1})
    assert "differing keys: `seed` 0 -> 1." in str(err.value)
    assert "give the run a new `name` (its folder is logging.dir = 'runs/{name}')" in str(err.value)
    assert "`--resume force`" in str(err.value)
    assert check_resume(ckpt, {**saved, "seed": 1}, force=True) == ["seed"]
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "recipe": "a"}))  # before recipes were stored
    with pytest.raises(ResumeRefused, match="did not record its recipe"):
        check_resume(ckpt, saved)


@pytest.mark.slow
def test_a_changed_recipe_is_refused_unless_forced(small_model: Path, tmp_path: Path, tally) -> None:
    run_dir = tmp_path / "run"
    env = run_env(uuid.uuid4().hex)
    rc, log = run(_cmd(run_dir, small_model, "learner.steps=1", "checkpoint.resume=never"), env, tmp_path / "1.log")
    assert rc == 0, log[-3000:]
    state = json.loads((run_dir / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["recipe"]["learner"]["steps"] == 1 and state["recipe"]["rewards"]["functions"] == []

    # allowed changes only: resumes and runs step 2
    rc, log = run(_cmd(run_dir, small_model, "learner.steps=2", "checkpoint.keep_last=3", "eval.at_end=false",
                       "logging.progress=true", "--resume"), env, tmp_path / "2.log")
    assert rc == 0, log[-3000:]
    assert steps(run_dir) == [1, 2]

    # a new reward function: refused before anything is built, and recipe.yaml is left as it was
    before = (run_dir / "recipe.yaml").read_text()
    rc, log = run(_cmd(run_dir, small_model, "learner.steps=3", NEW_REWARD, "--resume"), env, tmp_path / "3.log")
    assert rc == 1, log[-3000:]
    assert f"refusing to resume {run_dir / 'checkpoints' / 'step_2'}" in log
    assert "differing keys: `rewards.functions` [] -> '<absent>'; `rewards.functions[0].kwargs` '<absent>' -> {}" in log
    assert "`rewards.functions[0].name` '<absent>' -> 'format'" in log and "`learner.steps`" not in log
    assert "give the run a new `logging.dir`" in log and "resume anyway with `--resume force`" in log
    assert (run_dir / "recipe.yaml").read_text() == before and steps(run_dir) == [1, 2]

    # forced: resumes step 2's checkpoint under the new reward, whose scores are the ones logged from then on
    rc, log = run(_cmd(run_dir, small_model, "learner.steps=3", NEW_REWARD, "--resume", "force"), env,
                  tmp_path / "4.log")
    assert rc == 0, log[-3000:]
    assert "--resume force: resuming" in log and "rewards.functions[0].name" in log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "reward/math/format/format" in rows[2] and not any(k.startswith("reward/math/math/") for k in rows[2])
    assert any(k.startswith("reward/math/math/") for k in rows[1])
    tally["faults"] += 1
    tally["recovered"] += 1
