"""`vlm-sapo train` under torchrun on two CPU ranks (gloo): hf rollouts with ZeRO-2, vLLM rollouts with ZeRO-3, and
hf + ZeRO-2 with one rank SIGKILLed inside step 2 and the job restarted by torchrun (`--max-restarts 1`).

Every run finishes; after every step both ranks hold bitwise-equal weights (`VLM_SAPO_WEIGHT_DIGEST`: each rank
hashes its full weights into its own file, compared here); metrics.jsonl and a checkpoint of both ranks are written.
The restarted run resumes from step 1's checkpoint with no lost or repeated step, and ends with the uninterrupted
run's samples, metrics and weights, bit for bit. A reward with variance (a hash of the completion's characters) makes
every update a real gradient step, not weight decay alone.
"""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path

import pytest

from tests.reliability.reliability_helpers import FAST, expected_batches, fixture_rows, metrics, run, run_env
from vlm_sapo.checkpoint import verify_checkpoint
from vlm_sapo.weight_digest import DIGEST_ENV, last_digests

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
REWARD = "def compute_score(completion, ground_truth=None, **meta):\n    return {'overall': (sum(map(ord, completion)) % 5) / 4}\n"
COMPARED = ("reward/overall", "train/loss", "train/grad_norm", "train/entropy", "response/length_mean")


def _torchrun(tmp_path: Path, name: str, model: Path, *overrides: str, steps: int, fault: str = "",
              restarts: int = 0) -> tuple[Path, str]:
    reward = tmp_path / "hash_reward.py"
    reward.write_text(REWARD)
    run_dir = tmp_path / name
    cmd = [*TORCHRUN, "--max-restarts", str(restarts), "-m", "vlm_sapo.cli", "train", "recipes/smoke_cpu.yaml",
           f"model.path={model}", f"logging.dir={run_dir}", *FAST, f"learner.steps={steps}",
           "checkpoint.every_steps=1", "rollout.n=4", f"rewards.functions=[{{name: {reward}}}]", *overrides]
    env = run_env(uuid.uuid4().hex, fault, **{DIGEST_ENV: "1"})
    rc, log = run(cmd, env, tmp_path / f"{name}.log", timeout=500)
    assert rc == 0, log[-4000:]
    return run_dir, log


def _check_run(run_dir: Path, steps: int) -> tuple[list[dict], dict[int, str]]:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in rows)
    digests = last_digests(run_dir)
    assert sorted(digests) == [0, 1] and sorted(digests[0]) == list(range(1, steps + 1))
    assert digests[0] == digests[1], "the two ranks hold different weights"
    assert len(set(digests[0].values())) == steps, "some step left the weights unchanged"
    manifest = verify_checkpoint(run_dir / "checkpoints" / f"step_{steps}")
    assert manifest["world_size"] == 2 and {"rng/rank_0.pt", "rng/rank_1.pt"} <= set(manifest["files"])
    return rows, digests[0]


@pytest.mark.slow
def test_two_ranks_hf_zero2_and_a_killed_rank_restarted_by_torchrun(small_model: Path, tmp_path: Path, tally):
    reference, _ = _torchrun(tmp_path, "reference", small_model, steps=3)
    ref_rows, ref_digests = _check_run(reference, 3)
    ids = [r["id"] for r in fixture_rows()]
    assert [r["batch_ids"] for r in ref_rows] == [[pair[0]] for pair in expected_batches(ids, 3)]  # rank 0's half

    killed, log = _torchrun(tmp_path, "killed", small_model, steps=3, fault="kill_at:update:2@1", restarts=1)
    assert "injecting fault kill_at:update:2@1" in log and "exitcode: -9" in log
    assert log.count(f"resumed from {killed / 'checkpoints' / 'step_1'} at step 1") == 2  # both ranks, once
    rows, digests = _check_run(killed, 3)
    assert digests == ref_digests
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in ref_rows]
    assert [[r[k] for k in COMPARED] for r in rows] == [[r[k] for k in COMPARED] for r in ref_rows]
    tally["faults"] += 1
    tally["recovered"] += 1


@pytest.mark.slow
@pytest.mark.vllm
def test_two_ranks_vllm_zero3(small_model: Path, tmp_path: Path):
    run_dir, _ = _torchrun(tmp_path, "vllm", small_model, "rollout.backend=vllm", "learner.zero_stage=3", steps=2)
    rows, _ = _check_run(run_dir, 2)
    # step 2 samples from the weights each rank pushed into its own engine after step 1: still the learner's policy
    assert rows[1]["time/weight_sync"] > 0 and rows[1]["train/mismatch_logp_abs_diff_max"] < 1e-3
