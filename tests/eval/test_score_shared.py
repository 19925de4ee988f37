"""`vlm-sapo score` on the real benchmark samples in ../shared/data: gold predictions score 100%, shuffled ones score
what an independent count says (near chance); unknown and missing ids are reported, not dropped.

Gold predictions go through the command line; the other variants through the same function with one shared reward
pool and the benchmark loaded once (the command line starts a pool and validates every image on each call)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tests.eval.eval_helpers import as_model, iou, read_jsonl, write_jsonl
from vlm_sapo.cli import main
from vlm_sapo.eval import load_benchmark, score_predictions
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import default_reward_specs


@pytest.fixture(scope="module")
def pool():
    """One reward pool for the scoring calls made through the Python API (the CLI calls start their own)."""
    with RewardPool(default_reward_specs(["math", "chart", "grounding"])) as p:
        yield p


def _score_api(tmp_path: Path, name: str, rows: list[dict], bench, pool, **kwargs) -> dict[str, list[float]]:
    """The same scoring as `vlm-sapo score`, without reloading the benchmark: per-id scores, and the pass@1."""
    out = score_predictions(write_jsonl(tmp_path / f"{name}.jsonl", rows), bench, pool=pool, **kwargs)
    scores: dict[str, list[float]] = {}
    for p in out.predictions:
        scores.setdefault(p.id, []).append(p.score)
    return {"pass@1": out.benchmarks[bench.name].overall["pass@1"].value, "scores": scores}


def _score(tmp_path: Path, name: str, rows: list[dict], benchmark: str, data_root: Path, *extra: str) -> dict:
    preds = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / f"{name}_scored"
    assert main(["score", str(preds), "--benchmark", benchmark, "--data-root", str(data_root), "--out", str(out),
                 *extra]) == 0
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "predictions.jsonl", "results.png"}
    return json.loads((out / "results.json").read_text())


def _shuffled(values: list, seed: int = 0) -> list:
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


def _pass1(results: dict, name: str) -> float:
    return results["benchmarks"][name]["overall"]["pass@1"]["value"]


@pytest.mark.parametrize("name,relative", [("geometry3k", "geometry3k/geometry3k_test_300.jsonl"),
                                           ("wemath", "wemath/wemath_testmini_200.jsonl")])
def test_letter_benchmarks_gold_and_shuffled(shared_data, tmp_path, name, relative, pool, capsys):
    gold = read_jsonl(shared_data / relative)
    letters = [r["answer"] for r in gold]
    # gold answers for all but the first 3 samples, plus 2 ids the benchmark does not have: reported, not scored
    rows = [{"id": r["id"], "completion": as_model(r["answer"])} for r in gold[3:]]
    rows += [{"id": f"{name}_9999", "completion": as_model("A")}, {"id": 17, "completion": as_model("B")}]
    results = _score(tmp_path, "gold", rows, name, shared_data)
    bench = results["benchmarks"][name]
    assert bench["questions"] == len(gold) - 3 and _pass1(results, name) == 1.0
    per_row = {p["id"]: p["score"] for p in read_jsonl(tmp_path / "gold_scored" / "predictions.jsonl")}
    assert per_row == {r["id"]: 1.0 for r in gold[3:]}
    assert bench["missing_ids"] == [r["id"] for r in gold[:3]] and bench["unknown_ids"] == [f"{name}_9999", "17"]
    assert bench["dropped"] == {"unknown_ids": 2, "missing_ids": 3}
    err = capsys.readouterr().err
    assert "2 prediction id(s) are not in the benchmark" in err and "3 benchmark sample(s) have no prediction" in err
    md = (tmp_path / "gold_scored" / "results.md").read_text()
    assert f"{name}_9999" in md and gold[0]["id"] in md

    shuffled = _shuffled(letters)
    got = _score_api(tmp_path, "shuffled", [{"id": r["id"], "completion": as_model(s)} for r, s in zip(gold, shuffled)],
                     load_benchmark(name, data_root=shared_data), pool)
    hits = sum(s == g for s, g in zip(shuffled, letters))
    assert got["pass@1"] == pytest.approx(hits / len(gold))
    assert got["scores"] == {r["id"]: [float(s == r["answer"])] for r, s in zip(gold, shuffled)}
    chance = sum((c / len(letters)) ** 2 for c in Counter(letters).values())  # a random permutation's expectation
    assert abs(hits / len(gold) - chance) < 0.1, (hits / len(gold), chance)


def test_multichartqa_as_chartqa_gold_and_shuffled(shared_data, tmp_path, pool):
    gold = read_jsonl(shared_data / "multichartqa_single" / "multichartqa_direct_single_chart.jsonl")
    name = "chartqa=multichartqa_single"
    results = _score(tmp_path, "gold", [{"id": r["id"], "completion": as_model(r["answer"])} for r in gold], name,
                     shared_data)
    assert results["benchmarks"]["chartqa"]["layout"].startswith("MultiChartQA")
    assert _pass1(results, "chartqa") == 1.0
    bench = load_benchmark(name, data_root=shared_data)
    # the benchmark's own answer line ("Answer: ...") is read too
    got = _score_api(tmp_path, "answer_line", [{"id": r["id"], "prediction": f"I read the chart.\nAnswer: {r['answer']}"}
                                               for r in gold], bench, pool)
    assert got["pass@1"] == 1.0

    shuffled = _shuffled([r["answer"] for r in gold])
    got = _score_api(tmp_path, "shuffled", [{"id": r["id"], "completion": as_model(s)} for r, s in zip(gold, shuffled)],
                     bench, pool)
    same_text = sum(str(s).strip().lower() == str(r["answer"]).strip().lower() for r, s in zip(gold, shuffled))
    assert same_text / len(gold) <= got["pass@1"] < 0.1  # equal strings always count; little else does


def test_coco_as_refcoco_gold_and_shuffled(shared_data, tmp_path, pool):
    gold = read_jsonl(shared_data / "coco128_grounding" / "grounding.jsonl")
    name = "refcoco=coco128_grounding"
    results = _score(tmp_path, "gold", [{"id": r["id"], "completion": as_model(r["bbox"])} for r in gold], name,
                     shared_data, "--coord-system", "abs_original")
    assert _pass1(results, "refcoco") == 1.0
    assert results["benchmarks"]["refcoco"]["metric_label"] == "Acc@0.5"
    bench = load_benchmark(name, data_root=shared_data)
    # the same boxes in Qwen2-VL/Qwen3-VL units (0-1000 of the image), rounded to integers as a model writes them
    rel = [[round(v * 1000 / (r["image_width"] if i % 2 == 0 else r["image_height"])) for i, v in enumerate(r["bbox"])]
           for r in gold]
    got = _score_api(tmp_path, "rel", [{"id": r["id"], "completion": as_model(b), "coord_system": "rel1000"}
                                       for r, b in zip(gold, rel)], bench, pool)
    assert got["pass@1"] == 1.0

    shuffled = _shuffled([r["bbox"] for r in gold])
    got = _score_api(tmp_path, "shuffled", [{"id": r["id"], "completion": as_model(b)} for r, b in zip(gold, shuffled)],
                     bench, pool, coord_system="abs_original")

    def clipped(box: list[float], w: float, h: float) -> list[float]:
        return [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]

    right = {r["id"]: [float(iou(clipped(b, r["image_width"], r["image_height"]), r["bbox"]) >= 0.5)]
             for r, b in zip(gold, shuffled)}
    assert got["scores"] == right
    assert got["pass@1"] == pytest.approx(sum(v[0] for v in right.values()) / len(gold))
    assert got["pass@1"] < 0.2


def test_grounding_without_units_is_refused(shared_data, tmp_path, capsys):
    gold = read_jsonl(shared_data / "coco128_grounding" / "grounding.jsonl")[:2]
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "completion": as_model(r["bbox"])} for r in gold])
    assert main(["score", str(preds), "--benchmark", "refcoco=coco128_grounding", "--data-root", str(shared_data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "need their box units" in capsys.readouterr().err
