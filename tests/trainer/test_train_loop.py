"""`vlm-sapo train` end to end on a tiny Qwen2.5-VL: both rollout backends, SIGKILL + resume, broken checkpoints."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_sapo.data import load_samples
from vlm_sapo.data.mix import TaskMixSampler
from vlm_sapo.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "geometry3k" / "rows.jsonl"
CLI = [sys.executable, "-m", "vlm_sapo.cli"]
FAST = ["rollout.max_new_tokens=8", "rollout.n=2", "data.prompts_per_step=2", "algorithm.mini_batches=1",
        "logging.tensorboard=false", "logging.progress=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _train(run_dir: Path, *overrides: str, resume: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [*CLI, "train", "recipes/smoke_cpu.yaml", f"logging.dir={run_dir}", *FAST, *overrides]
    cmd += ["--resume"] if resume else ["checkpoint.resume=never"]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check_run(run_dir: Path, steps: int) -> list[dict]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for key in ("reward/overall", "train/loss", "train/gate_weight_mean", "train/gate_weight_lt_half_frac",
                    "train/log_ratio_var_mean", "train/mismatch_logp_abs_diff_max", "train/grad_norm",
                    "rollout/tokens_per_s", "train/learner_tokens_per_s", "time/update", "time/rollout_and_reward"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert len(r["batch_ids"]) == 2
    assert (run_dir / "hf" / "model.safetensors").is_file()
    return rows


@pytest.mark.slow
def test_train_smoke_hf_backend(tmp_path: Path) -> None:
    proc = _train(tmp_path / "run", "learner.steps=3", "checkpoint.every_steps=0", "eval.limit=2",
                  "data.val=[{path: tests/fixtures/geometry3k/rows.jsonl, task: math}]",
                  "eval.benchmarks=[jsonl:math:tests/fixtures/geometry3k/rows.jsonl]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _check_run(tmp_path / "run", 3)
    # validation rows and a benchmark, scored at the end with the training rewards
    assert 0.0 <= rows[-1]["val/math/accuracy"] <= 1.0 and "val/math/math/format" in rows[-1]
    assert any(k.startswith("eval/") and k.endswith("pass@1") for k in rows[-1]), sorted(rows[-1])
    assert (tmp_path / "run" / "eval" / "step_000003" / "results.json").is_file()
    # the hf engine samples with the learner's own module: rollout and old logprobs agree to fp32 noise
    assert all(r["train/mismatch_logp_abs_diff_max"] < 1e-4 for r in rows)


@pytest.mark.slow
@pytest.mark.vllm
def test_train_smoke_vllm_backend(tmp_path: Path) -> None:
    proc = _train(tmp_path / "run", "learner.steps=3", "checkpoint.every_steps=0", "rollout.backend=vllm",
                  "learner.lr=1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _check_run(tmp_path / "run", 3)
    # steps 2 and 3 sample from weights pushed into vLLM after an update at a large lr: still the learner's policy
    assert all(r["train/mismatch_logp_abs_diff_max"] < 1e-3 for r in rows), [r["train/mismatch_logp_abs_diff_max"]
                                                                             for r in rows]
    assert rows[1]["time/weight_sync"] > 0


def _expected_batches(steps: int, per_step: int = 2) -> list[list[str]]:
    """The data order, from the loader and the sampler alone (zero_variance_groups=keep resamples nothing)."""
    ids = [s.id for s in load_samples(FIXTURE, task="math").samples]
    sampler = TaskMixSampler([len(ids)], [1.0], seed=0)
    return [[ids[i] for _, i in sampler.next_batch(per_step)] for _ in range(steps)]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_data_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*CLI, "train", "recipes/smoke_cpu.yaml", f"logging.dir={run}", *FAST, "learner.steps=4",
            "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.resume=never"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_metrics(run)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "hf").exists()
    done = len(read_metrics(run))
    # a save interrupted by a crash, and a newer step without a manifest: neither may be loaded
    ckpts = run / "checkpoints"
    newest = max(int(p.name.split("_")[1]) for p in ckpts.glob("step_*"))
    assert newest >= 2
    (ckpts / ".step_7.tmp").mkdir()
    shutil.copytree(ckpts / f"step_{newest}", ckpts / "step_9")
    (ckpts / "step_9" / "manifest.json").unlink()

    proc = subprocess.run([*args[:-1], "--resume"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping invalid checkpoint" in proc.stderr and "step_9" in proc.stderr
    rows = _check_run(run, 4)
    assert [r["batch_ids"] for r in rows] == _expected_batches(4)
    assert done >= 2
