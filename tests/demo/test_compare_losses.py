"""The collapse counter of benchmarks/compare_losses.py, on reward curves whose events are known by construction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_losses.py"


def _collapse_events():
    spec = importlib.util.spec_from_file_location("compare_losses", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.collapse_events


def test_collapse_events_count_falls_below_half_of_the_best_so_far() -> None:
    count = _collapse_events()
    assert count([0.2, 0.4, 0.6, 0.8], window=1) == 0  # learning
    assert count([0.8, 0.5, 0.41], window=1) == 0  # never below half of 0.8
    assert count([0.8, 0.39, 0.3, 0.2], window=1) == 1  # one fall, staying down is the same event
    assert count([0.8, 0.3, 0.7, 0.3, 0.9, 0.44], window=1) == 3  # falls, recovers above half, falls again (x2)
    assert count([0.0, 0.0, 0.0], window=1) == 0  # no best above zero, nothing to fall from
    # the moving average smooths a one-step dip away: mean of (0.8, 0.8, 0.0) = 0.53 >= 0.4
    assert count([0.8, 0.8, 0.8, 0.0, 0.8], window=3) == 0
    assert count([0.8, 0.8, 0.8, 0.0, 0.0, 0.0], window=3) == 1
