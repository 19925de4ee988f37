"""Task-mix batches keep exact ratios and resume the same order; the metrics log never repeats or skips a step."""

from __future__ import annotations

from collections import Counter

import pytest

from vlm_sapo.data.mix import TaskMixSampler
from vlm_sapo.metrics_log import MetricsLog, read_metrics


def test_mix_gives_each_source_its_share_of_every_batch() -> None:
    s = TaskMixSampler(sizes=[10, 7, 50], weights=[2.0, 1.0, 1.0], seed=3)
    for _ in range(20):
        batch = s.next_batch(8)
        assert Counter(src for src, _ in batch) == {0: 4, 1: 2, 2: 2}


def test_mix_walks_a_permutation_per_epoch() -> None:
    s = TaskMixSampler(sizes=[5], weights=[1.0], seed=0)
    rows = [i for _, i in s.next_batch(15)]
    for epoch in range(3):
        assert sorted(rows[epoch * 5 : epoch * 5 + 5]) == list(range(5))
    assert rows[:5] != rows[5:10] or rows[5:10] != rows[10:15]  # reshuffled across epochs
    assert TaskMixSampler(sizes=[5], weights=[1.0], seed=0, shuffle=False).next_batch(5) == [(0, i) for i in range(5)]


def test_mix_resumes_exactly() -> None:
    a = TaskMixSampler(sizes=[4, 9], weights=[1.0, 3.0], seed=7)
    a.next_batch(5)
    state = a.state_dict()
    expected = [a.next_batch(3) for _ in range(6)]
    b = TaskMixSampler(sizes=[4, 9], weights=[1.0, 3.0], seed=7)
    b.load_state_dict(state)
    assert [b.next_batch(3) for _ in range(6)] == expected


def test_mix_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="usable row"):
        TaskMixSampler(sizes=[0], weights=[1.0])
    with pytest.raises(ValueError, match="one size and one weight"):
        TaskMixSampler(sizes=[1, 2], weights=[1.0])


def test_metrics_log_truncates_on_resume(tmp_path) -> None:
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.log(step, {"reward": step / 10, "loss": float("nan") if step == 2 else 0.0})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "rew')  # a line cut by a crash
    log = MetricsLog(tmp_path, tensorboard=False, resume_step=3)
    log.log(4, {"reward": 0.9})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == "nan" and rows[3]["reward"] == 0.9
    assert any((tmp_path / "tensorboard").iterdir())
