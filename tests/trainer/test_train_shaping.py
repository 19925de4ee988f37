"""`vlm-sapo train` with GDPO advantages over named reward components, DAPO overlong shaping and filtering, and the
DPPO-TV loss, end to end on the tiny Qwen2.5-VL (one run, about 30 s). Stop strings make the random policy end some
completions early, so lengths differ, the overlong penalty varies and some completions are truncated."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml
from test_train_loop import REPO, _env

from vlm_sapo.metrics_log import read_metrics


@pytest.mark.slow
def test_gdpo_overlong_and_dppo_train(tmp_path: Path) -> None:
    import subprocess

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlm_sapo.cli", "train", "recipes/smoke_cpu.yaml", f"logging.dir={run}",
           "rollout.max_new_tokens=8", "rollout.n=4", "data.prompts_per_step=2", "learner.steps=2",
           "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=0",
           "checkpoint.resume=never", "checkpoint.export_hf=false", "rollout.stop=[q, z, x, j, k]",
           "algorithm.advantage={name: gdpo, components: {accuracy: 1.0, format: 0.5}}",
           "algorithm.overlong={buffer: 4, filter: true}", "algorithm.loss={name: dppo_tv}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["algorithm"]
    assert saved["advantage"]["components"] == {"accuracy": 1.0, "format": 0.5, "overlong": 1.0}
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    updated = 0
    for r in rows:
        n = 8  # 2 prompts x 4 samples
        masked = r["overlong/masked"]
        assert masked == round(r["overlong/truncated_frac"] * n) == round(r["response/truncated_frac"] * n)
        assert -1.0 <= r["overlong/penalty_mean"] <= 0.0 and r["overlong/penalized_frac"] >= r["overlong/truncated_frac"]
        if "train/loss" not in r:
            continue
        updated += 1
        for key in ("train/clip_frac_high", "train/clip_frac_low", "train/ratio_capped_frac", "train/grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["batch/advantage_abs_mean"] > 0
        # the truncated completions (8 tokens each) never reach the learner: it saw the other completions' tokens,
        # split over min(2 mini-batches, completions left) updates
        kept_tokens = r["response/length_mean"] * n - 8 * masked
        k = min(2, n - int(masked))
        assert r["train/tokens"] * k == pytest.approx(kept_tokens)
    assert updated >= 1
