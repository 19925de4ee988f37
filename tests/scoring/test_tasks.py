"""Tasks: registry, prompt instructions, and training and evaluation scoring a sample identically."""

from __future__ import annotations

import pytest

import vlm_sapo.tasks.task as task_module
from tests.scoring.reward_helpers import as_model, read_rows
from vlm_sapo.data.sample import Sample
from vlm_sapo.scoring import ScoreItem
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import (
    FORMAT_INSTRUCTION,
    Task,
    coord_system_for_family,
    default_reward_specs,
    get_task,
    list_tasks,
    register_task,
)


def test_registry_is_open_and_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(task_module, "_TASKS", dict(task_module._TASKS))
    assert {"math", "grounding", "chart"} <= set(list_tasks())
    with pytest.raises(KeyError, match="did you mean 'chart'"):
        get_task("charts")
    reward_file = tmp_path / "counting_reward.py"
    reward_file.write_text(
        "def compute_score(completion, ground_truth, **meta):\n"
        "    ok = float(completion.strip() == str(ground_truth))\n"
        "    return {'overall': ok, 'accuracy': ok}\n"
    )
    counting = Task("counting", str(reward_file), lambda s: "Answer with a number.", str.strip)
    register_task(counting)
    with pytest.raises(ValueError, match="already registered"):
        register_task(counting)
    sample = Sample("c1", "counting", [], "How many circles?", 3, {})
    assert get_task("counting").evaluate(" 3 ", sample) == 1.0
    assert get_task("counting").evaluate("4", sample) == 0.0
    specs = default_reward_specs(["counting", "math"])
    assert [(s.name, s.tasks) for s in specs] == [(str(reward_file), ("counting",)), ("math", ("math",))]


def test_math_instruction_lists_the_choices():
    geometry = Sample("g", "math", [], "Find x.", "B", {"choices": ["30", "60", "120", "240"]})
    text = get_task("math").instruction_for(geometry)
    assert "Choices:\nA. 30\nB. 60\nC. 120\nD. 240\n" in text and FORMAT_INSTRUCTION in text
    wemath = Sample("w", "math", [], "Which?", "A", {"options": "A. 5; B. 10; C. 12; D. 20; E. No correct answer"})
    assert "E. No correct answer" in get_task("math").instruction_for(wemath)
    free = Sample("f", "math", [], "Compute.", "1/2", {})
    assert "Choices" not in get_task("math").instruction_for(free)


def test_grounding_instruction_follows_the_coordinate_system():
    texts = {}
    for coords in ("rel1000", "abs_resized", "abs_original"):
        sample = Sample("b", "grounding", [], "the dog", [1, 2, 3, 4], {"coord_system": coords})
        texts[coords] = get_task("grounding").instruction_for(sample)
    assert "0 to 1000" in texts["rel1000"] and "as you see it" in texts["abs_resized"]
    assert len(set(texts.values())) == 3
    with pytest.raises(ValueError, match="sample b0: grounding needs meta\\['coord_system'\\]"):
        get_task("grounding").instruction_for(Sample("b0", "grounding", [], "the dog", [1, 2, 3, 4], {}))


def test_a_rows_own_instruction_replaces_the_tasks_in_the_rendered_prompt(tiny_qwen25_dir):
    from vlm_sapo.models.loading import load_processor
    from vlm_sapo.tasks.prompting import render_task_prompt

    own = Sample("o", "math", [], "How many?", "3", {"instruction": "Answer in <answer> </answer>."})
    plain = Sample("p", "math", [], "How many?", "3", {"instruction": "  "})
    assert get_task("math").instruction(own) == "Answer in <answer> </answer>."
    assert get_task("math").instruction(plain) == get_task("math").instruction_for(plain)
    processor = load_processor(tiny_qwen25_dir)
    rendered, _ = render_task_prompt(processor, own, coord_system="abs_resized", min_pixels=3136, max_pixels=3136,
                                     image_patch_size=14, max_prompt_tokens=None)
    assert "How many?\nAnswer in <answer> </answer>." in rendered.text and FORMAT_INSTRUCTION not in rendered.text


@pytest.mark.parametrize(
    ("family", "coords"),
    [
        ("qwen2_vl", "rel1000"),
        ("qwen2_5_vl", "abs_resized"),
        ("Qwen2.5-VL", "abs_resized"),
        ("qwen3_vl", "rel1000"),
        ("qwen3_vl_moe", "rel1000"),
    ],
)
def test_coord_system_for_family(family, coords):
    assert coord_system_for_family(family) == coords


def test_coord_system_for_unknown_family():
    with pytest.raises(ValueError, match="llava"):
        coord_system_for_family("llava")


def test_training_and_evaluation_score_real_samples_identically(shared_data):
    """The pool (training) and Task.evaluate (evaluation) call the same function on the same sample."""
    samples, completions = [], []
    for row in read_rows(shared_data, "geometry3k/geometry3k_test_300.jsonl")[:8]:
        meta = {"choices": row["choices"]}
        samples.append(Sample(row["id"], "math", [], row["question"], row["answer"], meta))
    for row in read_rows(shared_data, "multichartqa_single/multichartqa_direct_single_chart.jsonl")[:8]:
        samples.append(Sample(row["id"], "chart", [], row["question"], row["answer"], {}))
    for row in read_rows(shared_data, "coco128_grounding/grounding.jsonl")[:8]:
        meta = {"image_width": row["image_width"], "image_height": row["image_height"], "coord_system": "abs_original"}
        samples.append(Sample(row["id"], "grounding", [], row["phrase"], row["bbox"], meta))
    for i, sample in enumerate(samples):  # alternate right, wrong and badly formatted answers
        right = sample.answer if sample.task != "grounding" else str([round(v) for v in sample.answer])
        completions.append([as_model(str(right)), as_model("D"), f"answer: {right}"][i % 3])
    with RewardPool(default_reward_specs(sorted({s.task for s in samples})), workers=2) as pool:
        results = pool.score([ScoreItem(s.id, s.task, c, s.answer, s.meta) for s, c in zip(samples, completions)])
    for sample, completion, result in zip(samples, completions, results):
        task = get_task(sample.task)
        local = task.reward(completion, sample)
        assert {f"{sample.task}/{k}": v for k, v in local.items()} == {
            k: v for k, v in result.scores.items() if not k.endswith("/error")
        }
        assert result.scores[f"{sample.task}/{task.metric}"] == task.evaluate(completion, sample)
        assert result.overall == local["overall"]
    assert [r.scores[f"{s.task}/accuracy"] for s, r in zip(samples, results)][::3] == [1.0] * 8


def test_metric_key_finds_the_tasks_own_reward_under_any_label():
    from vlm_sapo.scoring import RewardSpec
    from vlm_sapo.tasks import metric_key

    assert metric_key("math", default_reward_specs(["math", "chart"])) == "math/accuracy"
    assert metric_key("grounding", ["format", RewardSpec("grounding", label="box", kwargs={})]) == "box/accuracy"
    assert metric_key("mathvista", default_reward_specs(["mathvista"])) == "mathvista_reward/accuracy"
    assert metric_key("chart", [RewardSpec("chart", tasks=("math",))]) is None  # filtered away from the task
    assert metric_key("math", ["format"]) is None  # the recipe replaced the task's reward
