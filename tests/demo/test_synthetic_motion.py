"""The synthetic video task: which way a shape moves across 4 frames. Answers balanced exactly per split, recovered
from the pixels alone, rows loadable as videos and scored by the motion task's reward."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_sapo.cli import main
from vlm_sapo.data import load_samples
from vlm_sapo.demo.synthetic import SyntheticConfig, gold_completion, make_synthetic_data
from vlm_sapo.tasks import get_task

COUNTS = {"n_train": 24, "n_val": 4, "n_test": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("motion")
    assert main(["make-data", "synthetic", "--out", str(out), "--families", "motion", "--seed", "5",
                 "--n-train", "24", "--n-val", "4", "--n-test", "8"]) == 0
    return out


def _centre(path: Path) -> tuple[float, float, int]:
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    ys, xs = np.nonzero((a != 255).any(-1))
    return float(xs.mean()), float(ys.mean()), len(xs)


def test_answers_are_balanced_and_match_the_motion_in_the_pixels(data: Path) -> None:
    cfg = SyntheticConfig()
    for split, n in (("train", 24), ("val", 4), ("test", 8)):
        rows = [json.loads(line) for line in (data / "motion" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and set(Counter(r["answer"] for r in rows).values()) == {n // 4}
        for r in rows:
            assert len(r["video"]) == cfg.motion_frames and "image" not in r
            centres = [_centre(data / "motion" / rel) for rel in r["video"]]
            assert len({c[2] for c in centres}) == 1  # the whole shape in every frame: same pixel count
            dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
            travel = r["step"] * (cfg.motion_frames - 1)
            seen = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel)}[r["answer"]]
            assert (dx, dy) == pytest.approx(seen, abs=1e-6), (r["id"], dx, dy)


def test_rows_load_as_videos_and_gold_answers_score_one(data: Path) -> None:
    samples = load_samples(data / "motion" / "test.jsonl", task="motion").samples
    task = get_task("motion")
    assert len(samples) == 8 and all(s.images == [] and len(s.video.frames) == 4 for s in samples)
    for s in samples:
        assert task.reward(gold_completion("motion", s.answer), s) == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
        other = next(d for d in ("left", "right", "up", "down") if d != s.answer)
        assert task.reward(f"<think></think><answer>{other}</answer>", s)["accuracy"] == 0.0
        assert task.parse_answer(f"<think>x</think><answer> {s.answer.upper()}. </answer>") == s.answer


def test_same_seed_same_bytes_and_a_bad_config_is_refused(data: Path, tmp_path: Path) -> None:
    make_synthetic_data(tmp_path, seed=5, families=("motion",), **COUNTS)
    assert (tmp_path / "motion" / "train.jsonl").read_bytes() == (data / "motion" / "train.jsonl").read_bytes()
    with pytest.raises(ValueError, match="do not fit"):
        SyntheticConfig(motion_step=(4, 20))
