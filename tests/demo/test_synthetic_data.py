"""Synthetic demo data: deterministic, exact answers (re-derived from the pixels here), disjoint splits, loadable rows,
and gold answers that score 1 through the tasks' own rewards."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_sapo.data import Sample, load_samples
from vlm_sapo.demo.synthetic import FAMILIES, SyntheticConfig, gold_completion, make_synthetic_data
from vlm_sapo.tasks import get_task

# Independent of the generator's own tables: the demo's four colours as RGB.
RGB = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (30, 160, 60), "yellow": (230, 190, 20)}
COUNTS = {"n_train": 60, "n_val": 20, "n_test": 30}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_data(out, seed=3, **COUNTS)
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(data: Path, family: str, row: dict) -> np.ndarray:
    return np.asarray(Image.open(data / family / row["image"]).convert("RGB"))


def _mask(px: np.ndarray, colour: str) -> np.ndarray:
    return np.all(px == np.array(RGB[colour], dtype=np.uint8), axis=-1)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(data: Path, tmp_path: Path) -> None:
    make_synthetic_data(tmp_path / "again", seed=3, **COUNTS)
    assert _digest(tmp_path / "again") == _digest(data)
    make_synthetic_data(tmp_path / "other", seed=4, **COUNTS)
    assert (tmp_path / "other" / "math" / "test.jsonl").read_text() != (data / "math" / "test.jsonl").read_text()


def test_math_answers_match_the_shapes_counted_in_the_pixels(data: Path) -> None:
    cfg = SyntheticConfig()
    grid, cell = cfg.math_grid, 28
    for split in ("train", "val", "test"):
        for row in _rows(data / "math" / f"{split}.jsonl"):
            px = _pixels(data, "math", row)
            assert px.shape[:2] == (grid * cell, grid * cell)
            cells = [px[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] for r in range(grid) for c in range(grid)]
            # a cell holds a shape of colour C when at least 40 of its pixels are exactly C
            count = {name: sum(int(_mask(cell_px, name).sum() >= 40) for cell_px in cells) for name in RGB}
            painted = sum(int((cell_px != 255).any(axis=-1).sum() > 0) for cell_px in cells)
            assert painted == sum(count.values()), row["id"]  # nothing drawn but the four colours, one per cell
            q = row["question"]
            if q == "How many shapes are there?":
                want = painted
            elif q == "How many different colours are there?":
                want = sum(1 for n in count.values() if n)
            elif q.endswith("How many cells are empty?"):
                want = len(cells) - painted
            elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
                want = count[m[1]]
            elif m := re.fullmatch(r"How many (\w+) and (\w+) shapes are there in total\?", q):
                want = count[m[1]] + count[m[2]]
            elif m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", q):
                want = count[m[1]] - count[m[2]]
                assert want >= 0
            else:
                raise AssertionError(f"unexpected question {q!r}")
            assert row["answer"] == str(want), (row["id"], q, count)


def test_chart_answers_match_the_bar_heights_in_the_pixels(data: Path) -> None:
    scales = set()
    for split in ("train", "val", "test"):
        for row in _rows(data / "chart" / f"{split}.jsonl"):
            px = _pixels(data, "chart", row)
            heights = {}
            for name in RGB:
                ys, xs = np.nonzero(_mask(px, name))
                if len(ys):
                    heights[name] = int(ys.max() - ys.min() + 1)
                    # a bar is a solid rectangle standing on the axis row
                    assert _mask(px, name).sum() == heights[name] * (xs.max() - xs.min() + 1), row["id"]
                    assert ys.max() == px.shape[0] - 2, row["id"]
            values = dict(zip(row["bar_colours"], row["bar_values"]))
            assert set(heights) == set(values), row["id"]
            for name, value in values.items():  # one pixels-per-unit scale for every bar of every chart
                assert heights[name] % value == 0, (row["id"], heights, values)
                scales.add(heights[name] // value)
            q = row["question"]
            by_height = sorted(heights, key=heights.get)
            if q == "Which colour is the tallest bar?":
                want = by_height[-1]
                assert heights[by_height[-1]] > heights[by_height[-2]]
            elif q == "Which colour is the shortest bar?":
                want = by_height[0]
                assert heights[by_height[0]] < heights[by_height[1]]
            elif m := re.fullmatch(r"What is the value of the (\w+) bar\?", q):
                want = str(values[m[1]])
            elif m := re.fullmatch(r"What is the difference between the (\w+) bar and the (\w+) bar\?", q):
                want = str(abs(values[m[1]] - values[m[2]]))
            elif q == "What is the sum of all the bar values?":
                want = str(sum(values.values()))
            elif q == "What is the largest value in the chart?":
                want = str(max(values.values()))
            else:
                raise AssertionError(f"unexpected question {q!r}")
            assert row["answer"] == want, (row["id"], q, heights)
    assert len(scales) == 1, scales


def test_grounding_boxes_are_the_tight_box_of_the_described_shape(data: Path) -> None:
    fill = {"square": (0.99, 1.01), "circle": (0.70, 0.86), "triangle": (0.42, 0.62)}
    for split in ("train", "val", "test"):
        for row in _rows(data / "grounding" / f"{split}.jsonl"):
            colour, kind = re.fullmatch(r"Find the (\w+) (\w+)\. <image>", row["question"]).groups()
            px = _pixels(data, "grounding", row)
            # each 28-pixel cell's background is its own grey: where an object is, not only what, is in its token
            corners = {tuple(px[r * 28 + 1, c * 28 + 1]) for r in range(2) for c in range(2)}
            assert len(corners) == 4 and all(len(set(g)) == 1 for g in corners), (row["id"], corners)
            ys, xs = np.nonzero(_mask(px, colour))  # the target's colour is not shared by a distractor
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert row["answer"] == box, row["id"]
            ratio = len(xs) / ((box[2] - box[0]) * (box[3] - box[1]))
            lo, hi = fill[kind]
            assert lo <= ratio <= hi, (row["id"], kind, ratio)
            assert (row["image_width"], row["image_height"]) == (px.shape[1], px.shape[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_split_balances_its_answers(family: str, tmp_path: Path) -> None:
    """The most common answer of a split is within 5 points of uniform, so no constant answer scores well."""
    make_synthetic_data(tmp_path, seed=1, n_train=120, n_val=24, n_test=60, families=(family,))
    for split in ("train", "val", "test"):
        rows = _rows(tmp_path / family / f"{split}.jsonl")
        counts = Counter(json.dumps(r["answer"]) for r in rows)
        uniform = 1 / len(counts)
        assert len(counts) == {"math": 5, "chart": 4, "grounding": 12}[family], counts
        assert max(counts.values()) / len(rows) <= uniform + 0.05, (split, counts)


def test_splits_are_disjoint_by_id_and_by_scene(data: Path) -> None:
    for family in FAMILIES:
        seen_ids: set[str] = set()
        seen_scenes: dict[str, str] = {}
        for split in ("train", "val", "test"):
            rows = _rows(data / family / f"{split}.jsonl")
            assert len(rows) == COUNTS[f"n_{split}"]
            for row in rows:
                assert row["id"] not in seen_ids
                seen_ids.add(row["id"])
                scene = hashlib.sha256(_pixels(data, family, row).tobytes() + row["question"].encode()).hexdigest()
                assert seen_scenes.setdefault(scene, split) == split, (family, row["id"], "also in", seen_scenes[scene])


def test_rows_load_and_gold_answers_score_one(data: Path) -> None:
    for family in FAMILIES:
        samples = load_samples(data / family / "test.jsonl", task=family).samples
        assert len(samples) == COUNTS["n_test"]
        task = get_task(family)
        for s in samples:
            side = s.load_images()[0].size
            meta = {**s.meta, "coord_system": "abs_resized", "model_input_size": side, "image_size": side}
            scores = task.reward(gold_completion(family, s.answer), Sample(s.id, s.task, s.images, s.question,
                                                                           s.answer, meta))
            assert scores["accuracy"] == 1.0 and scores["format"] == 1.0, (s.id, scores)
            wrong = "[0, 0, 3, 3]" if family == "grounding" else "banana"
            assert task.reward(f"<think></think><answer>{wrong}</answer>", Sample(
                s.id, s.task, s.images, s.question, s.answer, meta))["accuracy"] == 0.0


def test_config_rejects_what_cannot_be_drawn() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        SyntheticConfig(shape_side=60)
    with pytest.raises(ValueError, match="multiple of 28"):
        SyntheticConfig(chart_side=100)
    with pytest.raises(ValueError, match="one shade per cell"):
        SyntheticConfig(grounding_shades=((255, 255, 255),))
    with pytest.raises(ValueError, match="unknown colours"):
        SyntheticConfig(colours=("red", "purple"))
    with pytest.raises(ValueError, match="distinct scenes"):
        make_synthetic_data(Path("/nonexistent/never-written"), n_train=5000, n_val=0, n_test=0, families=("grounding",))
