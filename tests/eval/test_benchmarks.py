"""Benchmark adapters on the hub's own column layouts (Parquet written by the real `datasets`, real images), naming,
and errors. Each test checks the mapped samples against values computed here from the rows written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.eval_helpers import REPO, as_model, png_bytes, read_jsonl, write_hub_parquet, write_jsonl
from vlm_sapo.data import DataError
from vlm_sapo.eval import list_benchmarks, load_benchmark, parse_benchmark, score_predictions
from vlm_sapo.tasks import get_task


def _features(**columns):
    import datasets

    return datasets.Features(columns)


def _v(dtype: str = "string"):
    import datasets

    return datasets.Value(dtype)


def _seq(inner):
    import datasets

    return datasets.Sequence(inner)


def _image():
    import datasets

    return datasets.Image()


def test_registry_and_names():
    assert set(list_benchmarks()) >= {"geometry3k", "mathvista", "mathverse", "mathvision", "wemath", "chartqa",
                                      "refcoco", "refcoco+", "refcocog"}
    ref = parse_benchmark("refcoco:testA=/data/RefCOCO")
    assert (ref.name, ref.split, ref.source, ref.spec.task) == ("refcoco", "testA", "/data/RefCOCO", "grounding")
    ref = parse_benchmark("jsonl:grounding:some/rows.jsonl")
    assert (ref.name, ref.spec.task, ref.source) == ("rows", "grounding", "some/rows.jsonl")
    assert parse_benchmark("jsonl:other/x.jsonl").spec.task == "math"
    with pytest.raises(KeyError, match="did you mean 'mathvista'"):
        parse_benchmark("mathvsta")


def test_offline_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="AI4Math/MathVista"):
        load_benchmark("mathvista")


def test_mathvista_hub_layout(tmp_path):
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school", "img_height": 100,
            "img_width": 100, "language": "english", "skills": ["geometry reasoning", "algebraic reasoning"],
            "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
    rows = [
        dict(pid="1", question="Find x.", image="images/1.jpg", decoded_image={"bytes": png_bytes(0), "path": None},
             choices=["3", "5", "7"], unit=None, precision=None, answer="5", question_type="multi_choice",
             answer_type="text", metadata=meta, query="Hint: ..."),
        dict(pid="2", question="How many?", image="images/2.jpg", decoded_image={"bytes": png_bytes(1), "path": None},
             choices=None, unit=None, precision=None, answer="12", question_type="free_form", answer_type="integer",
             metadata={**meta, "task": "figure question answering", "skills": ["arithmetic reasoning"]}, query="..."),
        dict(pid="3", question="What is the ratio?", image="images/3.jpg",
             decoded_image={"bytes": png_bytes(2), "path": None}, choices=None, unit=None, precision=2.0,
             answer="1.45", question_type="free_form", answer_type="float", metadata=meta, query="..."),
    ]
    feats = _features(pid=_v(), question=_v(), image=_v(), decoded_image=_image(), choices=_seq(_v()), unit=_v(),
                      precision=_v("float64"), answer=_v(), question_type=_v(), answer_type=_v(),
                      metadata={k: _seq(_v()) if k == "skills" else _v("int64") if k.startswith("img_") else _v()
                                for k in meta},
                      query=_v())
    folder = write_hub_parquet(tmp_path / "MathVista", "testmini", rows, feats)
    bench = load_benchmark("mathvista", data_root=tmp_path)  # found by the hub id's last part under --data-root
    assert bench.layout == "hub AI4Math/MathVista" and bench.source == str(folder)
    assert [s.id for s in bench.samples] == ["1", "2", "3"] and bench.spec.task == "mathvista"
    assert [s.answer for s in bench.samples] == ["5", "12", "1.45"]
    assert bench.samples[0].load_images()[0].size == (360, 218)  # the decoded_image bytes, not the `image` path
    assert bench.categories["1"] == ["task=geometry problem solving", "skill=geometry reasoning",
                                     "skill=algebraic reasoning"]
    task = get_task("mathvista")
    assert "A. 3\nB. 5\nC. 7" in task.instruction_for(bench.samples[0])
    assert "integer" in task.instruction_for(bench.samples[1])
    assert "2 decimal places" in task.instruction_for(bench.samples[2])

    # scored through the reward pool with MathVista's own rule (a reward file loaded by path in the workers)
    preds = [("1", "B"), ("1", "5"), ("1", "(C)"), ("2", "12.7"), ("2", "13"), ("3", "1.449"), ("3", "1.4")]
    expected = {"1": [1.0, 1.0, 0.0], "2": [1.0, 0.0], "3": [1.0, 0.0]}  # int(float) truncates; round to 2 places
    path = write_jsonl(tmp_path / "preds.jsonl", [{"id": i, "completion": as_model(a)} for i, a in preds])
    out = score_predictions(path, "mathvista", data_root=tmp_path, out_dir=tmp_path / "scored")
    got: dict[str, list[float]] = {}
    for row in read_jsonl(tmp_path / "scored" / "predictions.jsonl"):
        got.setdefault(row["id"], []).append(row["score"])
        assert row["scores"]["mathvista_reward/error"] == 0.0
    assert got == expected
    assert out.benchmarks["mathvista"].overall["pass@1"].value == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)


def test_refcoco_hub_layout_converts_boxes_and_splits_expressions(tmp_path):
    rows = [dict(question_id="r1", image={"bytes": png_bytes(0), "path": None}, question="Please describe the region.",
                 answer=["left shape", "the shape on the left"], segmentation=[1.0, 2.0, 3.0], bbox=[10, 20, 30, 40],
                 iscrowd=0, file_name="COCO_train2014_1.jpg"),
            dict(question_id="r2", image={"bytes": png_bytes(1), "path": None}, question="Please describe the region.",
                 answer=["top"], segmentation=[], bbox=[0.5, 1.5, 100, 50], iscrowd=0, file_name="COCO_train2014_2.jpg")]
    feats = _features(question_id=_v(), image=_image(), question=_v(), answer=_seq(_v()),
                      segmentation=_seq(_v("float32")), bbox=_seq(_v("float32")), iscrowd=_v("int8"), file_name=_v())
    write_hub_parquet(tmp_path / "RefCOCO", "testA", rows, feats)
    bench = load_benchmark("refcoco:testA=RefCOCO", data_root=tmp_path)
    assert [(s.id, s.question, s.answer) for s in bench.samples] == [
        ("r1#0", "left shape", [10.0, 20.0, 40.0, 60.0]), ("r1#1", "the shape on the left", [10.0, 20.0, 40.0, 60.0]),
        ("r2#0", "top", [0.5, 1.5, 100.5, 51.5])]
    assert "segmentation" not in bench.samples[0].meta
    with pytest.raises(DataError, match="no split 'val'"):
        load_benchmark("refcoco=RefCOCO", data_root=tmp_path)  # the default split is val

    # the gold box scores 1; the unconverted [x, y, w, h] box has IoU 1/3 with [10, 20, 40, 60] and scores 0
    preds = [{"id": "r1#0", "completion": as_model([10, 20, 40, 60])},
             {"id": "r1#1", "completion": as_model([10, 20, 30, 40])}]
    out = score_predictions(write_jsonl(tmp_path / "p.jsonl", preds), "refcoco:testA=RefCOCO", data_root=tmp_path,
                            coord_system="abs_original")
    assert [p.score for p in out.predictions] == [1.0, 0.0]
    assert out.benchmarks["refcoco"].missing_ids == ["r2#0"]


def test_chartqa_wemath_mathvision_geometry3k_hub_layouts(tmp_path):
    import datasets

    write_hub_parquet(tmp_path / "chartqa", "test", [
        dict(image={"bytes": png_bytes(0), "path": None}, query="What is the peak?", label=["12"], human_or_machine=0),
        dict(image={"bytes": png_bytes(1), "path": None}, query="Which is larger?", label=["Men"], human_or_machine=1),
    ], _features(image=_image(), query=_v(), label=_seq(_v()),
                 human_or_machine=datasets.ClassLabel(names=["human", "machine"])))
    chart = load_benchmark("chartqa", data_root=tmp_path)
    assert [(s.id, s.question, s.answer) for s in chart.samples] == [("chartqa:0", "What is the peak?", ["12"]),
                                                                      ("chartqa:1", "Which is larger?", ["Men"])]
    assert list(chart.categories.values()) == [["source=human"], ["source=machine"]]

    wemath_rows = [dict(ID="2steps_1", split="testmini", question="Which cylinder?", option="A. ①; B. ②; C. ③",
                        answer="B", key="2steps_1", image_path={"bytes": png_bytes(k), "path": None},
                        **{"knowledge concept": "Cylinders", "question number": 1,
                           "knowledge concept description": "..."}) for k in range(2)]  # We-Math IDs repeat
    write_hub_parquet(tmp_path / "We-Math", "testmini", wemath_rows, None)
    wemath = load_benchmark("wemath", data_root=tmp_path)
    assert [s.id for s in wemath.samples] == ["We-Math:0", "We-Math:1"]
    assert wemath.samples[0].meta["options"] == "A. ①; B. ②; C. ③"
    assert wemath.categories["We-Math:0"] == ["concept=Cylinders"]
    assert "B. ②" in get_task("math").instruction_for(wemath.samples[0])

    write_hub_parquet(tmp_path / "MathVision", "test", [
        dict(id="1", question="<image1> Which?", options=["1", "2", "3", "4", "5"], image="images/1.jpg",
             decoded_image={"bytes": png_bytes(0), "path": None}, answer="C", solution=None, level=2, subject="logic"),
        dict(id="2", question="<image1> How long?", options=[], image="images/2.jpg",
             decoded_image={"bytes": png_bytes(1), "path": None}, answer="7", solution=None, level=3, subject="logic"),
    ], _features(id=_v(), question=_v(), options=_seq(_v()), image=_v(), decoded_image=_image(), answer=_v(),
                 solution=_v(), level=_v("int64"), subject=_v()))
    vision = load_benchmark("mathvision", data_root=tmp_path)
    assert [s.meta["choices"] for s in vision.samples] == [["1", "2", "3", "4", "5"], None]
    assert "options" not in vision.samples[0].meta  # a list there would be misread as We-Math's option string
    assert vision.categories["2"] == ["subject=logic", "level=3"]

    write_hub_parquet(tmp_path / "geometry3k", "test", [
        dict(images=[{"bytes": png_bytes(0), "path": None}], problem="<image>Find x.", answer="5", id=2401,
             choices=["3", "5", "7", "9"], ground_truth="B")],
        _features(images=_seq(_image()), problem=_v(), answer=_v(), id=_v("int64"), choices=_seq(_v()),
                  ground_truth=_v()))
    geo = load_benchmark("geometry3k", data_root=tmp_path)
    (s,) = geo.samples
    assert (s.id, s.question, s.answer, s.meta["answer_value"]) == ("2401", "Find x.", "B", "5")

    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "chartqa:0", "completion": as_model("12.5")},
                                               {"id": "chartqa:1", "prediction": "Answer: women"}])
    out = score_predictions(preds, "chartqa", data_root=tmp_path)
    assert [p.score for p in out.predictions] == [1.0, 0.0]  # 12.5 is within 5% of 12


def test_layout_errors_name_the_source(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "picture": "x.png", "q": "?", "answer": "1"}])
    with pytest.raises(DataError, match=r"rows\.jsonl has columns .*match none of its layouts"):
        load_benchmark(f"geometry3k={path}")
    with pytest.raises(DataError, match="neither a file or folder"):
        load_benchmark("chartqa=./not/here")
    (tmp_path / "two").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / "two" / name, [{"id": "a"}])
    with pytest.raises(DataError, match="several JSON-lines files"):
        load_benchmark("wemath=two", data_root=tmp_path)


def test_jsonl_benchmark_in_project_format(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "geometry3k" / "rows.jsonl"
    rows = read_jsonl(fixture)[:3]
    for r in rows:
        r["image"] = str(fixture.parent / r["image"])
        r["category"] = r["problem_type_goal"]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    bench = load_benchmark(f"jsonl:math:{path}")
    assert bench.name == "mine" and [s.id for s in bench.samples] == [r["id"] for r in rows]
    assert bench.categories[rows[0]["id"]] == [f"category={c}" for c in rows[0]["problem_type_goal"]]


def test_bad_prediction_rows_are_named(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "geometry3k"
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "geometry3k_test_2432", "completion": "x"}\nnot json\n{"id": "b"}\n[1]\n')
    with pytest.raises(DataError) as err:
        score_predictions(path, f"geometry3k={fixture / 'rows.jsonl'}")
    text = str(err.value)
    assert "3 bad prediction row(s)" in text and "line 2: invalid JSON" in text
    assert "line 3, key 'completion'" in text and "line 4: a row must be a JSON object" in text


def test_rows_of_other_benchmarks_are_ignored_and_counted(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "geometry3k" / "rows.jsonl"
    gold = read_jsonl(fixture)
    rows = [{"id": r["id"], "benchmark": "geometry3k", "completion": as_model(r["answer"])} for r in gold]
    rows.append({"id": "x", "benchmark": "wemath", "completion": as_model("A")})
    out = score_predictions(write_jsonl(tmp_path / "p.jsonl", rows), f"geometry3k={fixture}")
    assert out.settings["rows_of_other_benchmarks"] == 1
    assert out.benchmarks["geometry3k"].overall["pass@1"].value == 1.0
    assert out.benchmarks["geometry3k"].unknown_ids == [] and out.benchmarks["geometry3k"].missing_ids == []


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative-path lookups must not see the repository
