"""The demo's two controls: the blind baseline (best constant answer) recomputed independently, and the image
shuffle (every row gets another row's image of its task, each image used once)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vlm_sapo.demo import FAMILIES, blind_baseline, load_split, shuffle_images, split_paths
from vlm_sapo.demo.synthetic import make_synthetic_data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("controls")
    make_synthetic_data(out, seed=2, n_train=12, n_val=0, n_test=60)
    return out


def _iou(a: list[int], b: list[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_blind_baseline_is_the_best_constant_answer(data: Path) -> None:
    got = blind_baseline(split_paths(data))
    for family in ("math", "chart"):  # exact-match answers: the best constant is the most common gold answer
        rows = [json.loads(line) for line in (data / family / "test.jsonl").read_text().splitlines()]
        top, n = Counter(r["answer"] for r in rows).most_common(1)[0]
        assert got[family]["accuracy"] == pytest.approx(n / len(rows))
        assert got[family]["accuracy"] <= 1 / len(set(r["answer"] for r in rows)) + 0.05  # balanced
    boxes = [json.loads(line)["answer"] for line in (data / "grounding" / "test.jsonl").read_text().splitlines()]
    best = max(sum(_iou(c, b) >= 0.5 for b in boxes) / len(boxes) for c in boxes)  # IoU by hand, in pixels
    assert got["grounding"]["accuracy"] == pytest.approx(best)
    assert 0 < best < 0.3


def test_shuffle_gives_every_row_another_rows_image_of_its_task(data: Path) -> None:
    samples = load_split(split_paths(data), "test")
    shuffled = shuffle_images(samples, seed=5)
    assert [s.id for s in shuffled] == [s.id for s in samples]
    assert [s.answer for s in shuffled] == [s.answer for s in samples]
    own = {s.id: s.images[0].path for s in samples}
    for family in FAMILIES:
        got = [s for s in shuffled if s.task == family]
        paths = [s.images[0].path for s in got]
        assert sorted(paths) == sorted(own[s.id] for s in got)  # each image once
        assert all(own[s.id] != s.images[0].path for s in got)  # none keeps its own
        assert all(f"/{family}/" in str(p) for p in paths)
    assert [s.images[0].path for s in shuffle_images(samples, seed=5)] == [s.images[0].path for s in shuffled]
