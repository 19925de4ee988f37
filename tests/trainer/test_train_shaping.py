"""`vlm-sapo train recipes/motion_video_cpu.yaml` end to end (one run, about a minute): the synthetic video task
through the transformers engine and the DeepSpeed learner (one row per micro-batch, so every row's video travels
alone), with GDPO advantages over named reward components, DAPO overlong shaping and filtering, and the DPPO-TV loss.
Stop strings make the random policy end some completions early, so lengths differ, the overlong penalty varies and
some completions are truncated."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainer.test_train_loop import REPO, _env
from vlm_sapo.demo.synthetic import make_synthetic_data
from vlm_sapo.metrics_log import read_metrics


@pytest.mark.slow
def test_video_gdpo_overlong_and_dppo_train(tmp_path: Path) -> None:
    paths = make_synthetic_data(tmp_path / "data", seed=0, n_train=16, n_val=4, n_test=0, families=("motion",))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlm_sapo.cli", "train", "recipes/motion_video_cpu.yaml", f"logging.dir={run}",
           f"data.train=[{{path: {paths['motion']['train']}, task: motion}}]",
           f"data.val=[{{path: {paths['motion']['val']}, task: motion}}]", "data.prompts_per_step=2",
           "rollout.max_new_tokens=8", "learner.steps=2", "learner.micro_batch_tokens=64", "logging.progress=false",
           "checkpoint.export_hf=false", "checkpoint.resume=never", "rollout.stop=[q, z, x, j, k]"]
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
        # the learner scored the video prompts exactly as the engine sampled them (the hf engine shares its module)
        assert r["train/mismatch_logp_abs_diff_max"] < 1e-4
        # the truncated completions (8 tokens each) never reach the learner: it saw the other completions' tokens,
        # split over min(2 mini-batches, completions left) updates
        kept_tokens = r["response/length_mean"] * n - 8 * masked
        k = min(2, n - int(masked))
        assert r["train/tokens"] * k == pytest.approx(kept_tokens)
        assert r["train/micro_batches"] * k == n - masked  # 64-token budget: one row (prompt ~47 tokens) each
    assert updated >= 1
    assert 0.0 <= rows[-1]["val/motion/accuracy"] <= 1.0  # validation renders and scores the videos too
