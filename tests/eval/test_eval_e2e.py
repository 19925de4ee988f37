"""`vlm-sapo eval` end to end on a tiny random Qwen2.5-VL, with each backend, over four real benchmarks (5 samples
each, 2 completions per sample); then `vlm-sapo score` re-scores its predictions and `vlm-sapo compare` diffs them.

A random model scores about 0, so the checks are on the plumbing: every prompt is re-rendered here with
`render_prompt` and the task's instruction (as training renders it), every completion re-scored in this process with
its task's reward, and every table number recomputed from predictions.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.eval_helpers import read_jsonl
from vlm_sapo.cli import main
from vlm_sapo.data import render_prompt
from vlm_sapo.eval import load_benchmark
from vlm_sapo.scoring import load_reward
from vlm_sapo.tasks import get_task

BENCHMARKS = ["geometry3k", "wemath", "chartqa=multichartqa_single", "refcoco=coco128_grounding"]
NAMES = ["geometry3k", "wemath", "chartqa", "refcoco"]
LIMIT, N = 5, 2


def _eval(model: Path, data_root: Path, out: Path, backend: str) -> None:
    argv = ["eval", "--model", str(model), "--benchmarks", ",".join(BENCHMARKS), "--data-root", str(data_root),
            "--limit", str(LIMIT), "--n", str(N), "--backend", backend, "--max-new-tokens", "8",
            "--max-prompt-tokens", "1024", "--out", str(out), "--no-progress"]
    assert main(argv) == 0


def _check_run(out: Path, model: Path, data_root: Path, backend: str, capsys) -> None:
    from vlm_sapo.models.loading import load_processor

    printed = capsys.readouterr().out
    assert all(f"| **{name}** |" in printed for name in NAMES) and f"results written to {out}" in printed
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "predictions.jsonl", "results.png"}
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 200
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["backend"] == backend and results["settings"]["n"] == N
    assert results["settings"]["temperature"] == 1.0  # the default for n > 1
    assert list(results["benchmarks"]) == NAMES
    md = (out / "results.md").read_text()
    assert all(f"| **{name}** |" in md for name in NAMES)

    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == len(NAMES) * LIMIT * N
    processor = load_processor(model)
    lo, hi = processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]
    for spec, name in zip(BENCHMARKS, NAMES):
        bench = load_benchmark(spec, data_root=data_root, limit=LIMIT)
        rows = [p for p in preds if p["benchmark"] == name]
        assert [(p["id"], p["sample_index"]) for p in rows] == [(s.id, k) for s in bench.samples for k in range(N)]
        task = get_task(bench.spec.task)
        reward = load_reward(task.reward_name)
        for sample in bench.samples:
            # the prompt training would render: coord_system in the meta first, then the task's instruction
            sample.meta = {**sample.meta, "coord_system": "abs_resized"}  # Qwen2.5-VL's units
            expected = render_prompt(processor, sample, instruction=task.instruction_for(sample), min_pixels=lo,
                                     max_pixels=hi, image_patch_size=14, max_prompt_tokens=1024)
            for p in (p for p in rows if p["id"] == sample.id):
                assert p["prompt"] == expected.text
                meta = {**sample.meta, "model_input_size": expected.model_input_sizes[0],
                        "image_size": expected.original_sizes[0]}
                if name == "refcoco":
                    assert p["model_input_size"] == list(expected.model_input_sizes[0])
                    assert "pixels of the image as you see it" in p["prompt"]
                assert p["score"] == reward.score_one(p["completion"], sample.answer, meta)[task.metric]
                assert p["error"] is None and p["finish_reason"] in ("stop", "length")
        # the table's numbers from the predictions
        by_id: dict[str, list[float]] = {}
        for p in rows:
            by_id.setdefault(p["id"], []).append(p["score"])
        overall = results["benchmarks"][name]["overall"]
        assert results["benchmarks"][name]["questions"] == LIMIT
        assert overall["pass@1"]["value"] == pytest.approx(sum(sum(v) / N for v in by_id.values()) / LIMIT)
        assert overall["pass@2"]["value"] == pytest.approx(sum(max(v) for v in by_id.values()) / LIMIT)
        assert overall["avg@2"]["value"] == pytest.approx(overall["pass@1"]["value"])
        assert all(s["ci_method"] == "wilson" and s["ci_low"] <= s["value"] <= s["ci_high"]
                   for s in overall.values())
        assert overall["pass@1"]["ci_high"] > 0.4  # 5 questions: a wide interval even at 0%
        cats = results["benchmarks"][name]["categories"]
        assert sum(c["questions"] for c in cats.values()) >= LIMIT  # every sample is in at least one category
        # the spread of the answers, recounted from the predictions' parsed answers
        keys = [json.dumps(p["parsed_answer"]) if p["parsed_answer"] not in (None, "") else None for p in rows]
        answers = results["benchmarks"][name]["answers"]
        assert answers["count"] == len(rows) and answers["distinct"] == len(set(keys))
        assert answers["top_share"] == pytest.approx(max(keys.count(k) for k in set(keys)) / len(rows))
        assert f"answers: {answers['distinct']} distinct" in printed


def test_eval_hf_then_score_and_compare(tiny_qwen25_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "hf"
    _eval(tiny_qwen25_dir, shared_data, out, "hf")
    _check_run(out, tiny_qwen25_dir, shared_data, "hf", capsys)

    # eval's predictions carry the box units and sizes, so `score` reproduces every grounding score
    rescored = tmp_path / "rescored"
    assert main(["score", str(out / "predictions.jsonl"), "--benchmark", "refcoco=coco128_grounding",
                 "--data-root", str(shared_data), "--out", str(rescored)]) == 0
    again = {(p["id"], p["sample_index"]): p["score"] for p in read_jsonl(rescored / "predictions.jsonl")}
    first = {(p["id"], p["sample_index"]): p["score"] for p in read_jsonl(out / "predictions.jsonl")
             if p["benchmark"] == "refcoco"}
    assert again == first
    b = json.loads((rescored / "results.json").read_text())["benchmarks"]["refcoco"]
    assert len(b["missing_ids"]) == min(50, 164 - LIMIT) and b["dropped"]["missing_ids"] == 164 - LIMIT
    assert json.loads((rescored / "results.json").read_text())["settings"]["rows_of_other_benchmarks"] == 30

    capsys.readouterr()
    assert main(["compare", str(out), str(rescored / "results.json")]) == 0
    table = capsys.readouterr().out
    a_pass = json.loads((out / "results.json").read_text())["benchmarks"]["refcoco"]["overall"]["pass@1"]["value"]
    row = next(line for line in table.splitlines() if line.startswith("| **refcoco**"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{LIMIT}/{LIMIT}" and cells[2] == cells[3] == f"{100 * a_pass:.1f}" and cells[4] == "+0.0"
    geo = next(line for line in table.splitlines() if line.startswith("| **geometry3k**"))
    cells = [c.strip() for c in geo.strip("|").split("|")]
    assert cells[1] == f"{LIMIT}/—" and set(cells[3::3]) == set(cells[4::3]) == {"—"}  # only in A: no B, no delta


@pytest.mark.vllm
def test_eval_vllm(tiny_qwen25_dir, shared_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = tmp_path / "vllm"
    _eval(tiny_qwen25_dir, shared_data, out, "vllm")
    _check_run(out, tiny_qwen25_dir, shared_data, "vllm", capsys)


def test_compare_deltas_and_marks(tmp_path, capsys):
    def result(p: float, lo: float, hi: float, n: int) -> dict:
        stat = {"value": p, "ci_low": lo, "ci_high": hi, "ci_method": "wilson"}
        return {"schema": "vlm_sapo.eval/1", "settings": {}, "benchmarks": {"geometry3k": {
            "questions": n, "overall": {"pass@1": stat},
            "categories": {"goal=Area": {"questions": 3, "pass@1": stat}}}}}

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(result(0.25, 0.2, 0.3, 300)))
    (tmp_path / "b.json").write_text(json.dumps(result(0.40, 0.35, 0.45, 300)))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b.json"), "--out", str(tmp_path / "c.md")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| **geometry3k**"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["**geometry3k**", "300/300", "25.0", "40.0", "+15.0*"]
    assert "goal=Area" in (tmp_path / "c.md").read_text()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "bad.json")]) == 2


def test_evaluate_api_counts_long_prompts(tiny_qwen25_dir, shared_data):
    """`evaluate` as the trainer calls it: an engine it does not own, benchmarks already loaded, a prompt limit."""
    from vlm_sapo.eval import EvalConfig, evaluate
    from vlm_sapo.models.loading import load_processor
    from vlm_sapo.rollout import SamplingConfig
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine
    from vlm_sapo.tasks.prompting import render_task_prompt

    processor = load_processor(tiny_qwen25_dir)
    bench = load_benchmark("chartqa=multichartqa_single", data_root=shared_data, limit=6)
    size = processor.image_processor.size
    lengths = [render_task_prompt(processor, s, coord_system="abs_resized", min_pixels=size["shortest_edge"],
                                  max_pixels=size["longest_edge"], image_patch_size=14,
                                  max_prompt_tokens=None)[0].num_prompt_tokens for s in bench.samples]
    limit = sorted(lengths)[len(lengths) // 2]
    kept = sum(n <= limit for n in lengths)
    assert 0 < kept < len(lengths)
    engine = HFRolloutEngine.from_pretrained(tiny_qwen25_dir, processor, dtype="float32")
    config = EvalConfig(family="qwen2_5_vl", max_prompt_tokens=limit,
                        sampling=SamplingConfig(temperature=0.0, max_new_tokens=4))
    results = evaluate(engine, processor, [bench], config, progress=False)
    chart = results.benchmarks["chartqa"]
    assert chart.dropped == {"too_long": len(lengths) - kept} and chart.questions == kept
    assert chart.overall["pass@1"].method == "wilson" and list(chart.overall) == ["pass@1"]
    assert set(results.metrics()) == {"eval/chartqa/pass@1", "eval/chartqa/answers/distinct",
                                      "eval/chartqa/answers/top_share"}
    assert chart.answers["count"] == kept and 1 <= results.metrics()["eval/chartqa/answers/distinct"] <= kept
    assert engine.model is not None  # the caller's engine is left open
    engine.close()
