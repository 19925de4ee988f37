"""The vLLM engine dies inside `vlm-sapo train` (a real in-process engine; the model's forward crashes inside it).

`rollout.on_engine_death=fail` stops with an error naming the engine, the step and the resume point; `restart`
re-executes the trainer with `--resume`, which continues from the newest checkpoint with a fresh engine. Neither hangs.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.reliability_helpers import (
    checkpoints,
    expected_batches,
    fixture_rows,
    metrics,
    run,
    run_env,
    steps,
    train_args,
    wait_for_no_processes,
)

VLLM = ["rollout.backend=vllm", "learner.steps=3", "checkpoint.every_steps=1", "learner.lr=1e-3", "rewards.workers=1"]


@pytest.mark.slow
@pytest.mark.vllm
def test_engine_death_fails_clearly_then_restart_resumes_and_finishes(tmp_path: Path, small_model: Path,
                                                                      tally: Counter) -> None:
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    engine = f"vllm engine ({small_model})"

    # fail: the run stops at the dead engine's step, naming it; step 1's checkpoint is the resume point
    cmd = train_args(run_dir, small_model, *VLLM, "rollout.on_engine_death=fail")
    rc, log = run(cmd, run_env(tag, "engine_death:2"), tmp_path / "fail.log", timeout=240)
    assert rc == 1, log[-3000:]
    assert (f"training stopped: step 2: the rollout engine died: {engine}: generate failed: RuntimeError: "
            "VLM_SAPO_FAULT engine_death") in log, log[-3000:]
    assert f"nothing of step 2 was saved; `--resume` continues from {run_dir / 'checkpoints' / 'step_1'}" in log
    assert steps(run_dir) == [1] and checkpoints(run_dir) == ["step_1"]
    assert wait_for_no_processes(tag) == []

    # restart: resumed from step_1, the engine dies again at step 3; the trainer re-executes itself with --resume
    cmd = train_args(run_dir, small_model, *VLLM, "rollout.on_engine_death=restart", resume=True)
    rc, log = run(cmd, run_env(tag, "engine_death:3"), tmp_path / "restart.log", timeout=360)
    assert rc == 0, log[-3000:]
    tally.update(faults=2, recovered=2)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_1'} at step 1" in log
    assert "step 3: the rollout engine died" in log and "restart 1 of 3: re-executing with --resume" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2" in log
    assert log.count("VLM_SAPO_FAULT: injecting fault") == 1, "a fault must not fire again after the restart"
    assert log.rstrip().endswith(f"run finished: {run_dir}")
    assert wait_for_no_processes(tag) == []

    rows = metrics(run_dir)
    order = expected_batches([r["id"] for r in fixture_rows()], 3)
    missing = Counter(i for b in order for i in b) - Counter(i for r in rows for i in r["batch_ids"])
    tally["lost"] += sum(missing.values())
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["batch_ids"] for r in rows] == order
    # the restarted engine samples from the learner's weights (loaded from step_2 and pushed into the new engine)
    assert all(r["train/mismatch_logp_abs_diff_max"] < 1e-3 for r in rows), [r["train/mismatch_logp_abs_diff_max"]
                                                                              for r in rows]
    assert checkpoints(run_dir) == ["step_2", "step_3"]
