"""benchmarks/sapo_regime.py --quick: the experiment's machinery end to end (cold starts, the real Trainer stepped with
the loss observer, the K = 1 identity, the summary and the rendered table), on 2 arms, 1 seed, 3 steps. Not timed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_report_module():
    """benchmarks/sapo_regime_report.py by its path. Not by putting benchmarks/ on sys.path: the reward workers of
    every later in-process run inherit sys.path, and there benchmarks/rewards.py would shadow the `rewards` package."""
    spec = importlib.util.spec_from_file_location("sapo_regime_report", REPO / "benchmarks" / "sapo_regime_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fields_for = _load_report_module().fields_for


def test_quick_run_reports_every_field_and_the_k1_identity(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sapo_regime.py"), "--quick", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "sapo_regime.json").read_text())
    assert data["failed_runs"] == [] and data["k1_violations"] == []
    assert len(data["k1_identity"]) == 1 and "2 losses" in data["k1_identity"][0]
    # the K = 1 control, from the raw rows: both losses' first step is the same update, at r = 1 exactly
    first = [r["rows"][0] for r in data["runs"]]
    assert first[0]["reward"] == first[1]["reward"]
    assert math.isclose(first[0]["grad_norm"], first[1]["grad_norm"], rel_tol=1e-4)
    assert all(u["ratio_max"] == 1.0 for row in first for u in row["updates"])
    for spec in data["arms"]:
        runs = data["per_run"][spec["name"]]
        assert len(runs) == 1
        for field in fields_for(spec["loss"]["name"]):
            value = runs[0][field]
            if field == "instability_step" and runs[0]["stable"] == 1.0:
                assert math.isnan(value)  # "never": no step to report
                continue
            assert math.isfinite(value), (spec["name"], field, value)
    for name in ("dense", "moe"):
        ctl = [v for k, v in data["controls"].items() if k.startswith(name)]
        for c in ctl:
            assert set(c["blind"]) == set(c["shuffled"]) == {"math", "chart", "grounding"}
            assert 0.0 <= c["cold_acc"]["mean"] <= 1.0
    table = (tmp_path / "sapo_regime.md").read_text()
    assert "| k | moe | sapo | 1 |" in table and "| k | moe | grpo | 1 |" in table
    assert (tmp_path / "sapo_regime.png").stat().st_size > 0
