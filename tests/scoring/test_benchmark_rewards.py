"""Every real benchmark row: the gold answer, written as a model would, scores 1; a perturbed one scores 0."""

from __future__ import annotations

import re

import pytest

from rewards import chart, grounding, math
from tests.scoring.reward_helpers import as_model, read_rows, ref_iou

LETTERS = "ABCDEFGH"


def _letter_forms(letter: str, value: str) -> list[str]:
    return [letter, f"({letter})", f"{letter}.", f"{letter}. {value}", f"\\boxed{{{letter}}}"]


def test_geometry3k_every_row(shared_data):
    rows = read_rows(shared_data, "geometry3k/geometry3k_test_300.jsonl")
    assert len(rows) == 300
    scored = 0
    for row in rows:
        choices, gold = row["choices"], row["answer"]
        value = choices[LETTERS.index(gold)]
        for form in [*_letter_forms(gold, value), value]:
            score = math.compute_score(as_model(form), gold, choices=choices)
            assert score["accuracy"] == 1.0, (row["id"], form, score)
            assert score["format"] == 1.0 and score["overall"] == pytest.approx(1.0)
        wrong = LETTERS[(LETTERS.index(gold) + 1) % len(choices)]
        assert math.compute_score(as_model(wrong), gold, choices=choices)["accuracy"] == 0.0, row["id"]
        other_values = [c for c in choices if c.replace(" ", "") != value.replace(" ", "")]
        wrong_value = other_values[0]
        assert math.compute_score(as_model(wrong_value), gold, choices=choices)["accuracy"] == 0.0, (
            row["id"],
            wrong_value,
        )
        scored += 1
    print(f"geometry3k: {scored} rows scored")
    assert scored == 300


def _unambiguous_value(value: str, options: dict[str, str]) -> bool:
    """A value answer names one option only when it cannot read as a letter and no other option has the same text."""
    looks_like_letter = re.match(r"\(?[A-H]\)?([.:)\s]|$)", value)
    same_text = [v for v in options.values() if v.lower().replace(" ", "") == value.lower().replace(" ", "")]
    return not looks_like_letter and len(same_text) == 1


def _split_options_independently(options: str) -> dict[str, str]:
    # the shared rows all list A, B, ... separated by ';' followed by the next letter and a dot and a non-';' char
    parts = re.split(r";\s*(?=[B-H]\.(?!;))", options.strip())
    out = {}
    for part in parts:
        letter, _, value = part.partition(".")
        out[letter.strip()] = value.strip().rstrip(";").strip()
    return out


def test_wemath_every_row(shared_data):
    rows = read_rows(shared_data, "wemath/wemath_testmini_200.jsonl")
    assert len(rows) == 200
    value_forms = 0
    for row in rows:
        gold, options = row["answer"], row["options"]
        expected = _split_options_independently(options)
        assert math.parse_options(options) == expected, row["id"]
        value = expected[gold]
        forms = _letter_forms(gold, value)
        if _unambiguous_value(value, expected):
            forms.append(value)
            value_forms += 1
        for form in forms:
            score = math.compute_score(as_model(form), gold, options=options)
            assert score["accuracy"] == 1.0, (row["id"], form, score)
        wrong = [letter for letter in expected if letter != gold][0]
        assert math.compute_score(as_model(wrong), gold, options=options)["accuracy"] == 0.0, row["id"]
    print(f"wemath: {len(rows)} rows scored ({value_forms} also answered by value)")
    assert value_forms > 150


def _independent_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_multichartqa_every_row(shared_data):
    rows = read_rows(shared_data, "multichartqa_single/multichartqa_direct_single_chart.jsonl")
    assert len(rows) == 142
    numeric = 0
    texts = [r["answer"] for r in rows]
    for row in rows:
        gold = row["answer"]
        assert chart.compute_score(as_model(gold), gold)["accuracy"] == 1.0, row["id"]
        assert chart.compute_score(as_model(gold.upper() + " "), gold)["accuracy"] == 1.0, row["id"]
        label = _independent_number(gold)
        if row["answer_is_numeric"]:
            numeric += 1
            off = label * 1.2 if label != 0 else 1.0  # 20% off, or 1 for a label of 0 (any nonzero is wrong)
            assert chart.compute_score(as_model(f"{off:g}"), gold)["accuracy"] == 0.0, (row["id"], off)
            near = label * 1.04  # inside the 5% tolerance
            assert abs(near - label) <= 0.05 * abs(label)
            assert chart.compute_score(as_model(repr(near)), gold)["accuracy"] == 1.0, (row["id"], near)
        else:
            other = next(
                t for t in texts if t.strip().lower() != gold.strip().lower() and _independent_number(t) is None
            )
            assert chart.compute_score(as_model(other), gold)["accuracy"] == 0.0, (row["id"], other)
    print(f"multichartqa_single: {len(rows)} rows scored ({numeric} numeric)")
    assert numeric == 80


def _smart_resize_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    from qwen_vl_utils import smart_resize

    h, w = smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=max_pixels)
    return w, h


def _as_model_box(box: list[float], style: int) -> str:
    x1, y1, x2, y2 = box
    if style == 0:
        return as_model(f"[{x1}, {y1}, {x2}, {y2}]")
    if style == 1:
        return f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "it"}}]\n```'
    return f"<think>there</think><answer><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|></answer>"


@pytest.mark.parametrize("coord_system", ["abs_original", "rel1000", "abs_resized"])
def test_coco_grounding_every_row_in_each_coordinate_system(shared_data, coord_system):
    rows = read_rows(shared_data, "coco128_grounding/grounding.jsonl")
    assert len(rows) == 164
    max_pixels = 256 * 28 * 28  # smaller than the 640 x 480 photos, so the resize really scales the boxes
    for i, row in enumerate(rows):
        width, height, gold = row["image_width"], row["image_height"], row["bbox"]
        meta = {"image_width": width, "image_height": height, "coord_system": coord_system}
        if coord_system == "abs_original":
            scale_x = scale_y = 1.0
        elif coord_system == "rel1000":
            scale_x, scale_y = 1000 / width, 1000 / height
        else:
            in_w, in_h = _smart_resize_size(width, height, max_pixels)
            assert in_w % 28 == 0 and in_h % 28 == 0 and in_w * in_h <= max_pixels
            meta["model_input_size"] = [in_w, in_h]
            scale_x, scale_y = in_w / width, in_h / height
        model_box = [
            round(gold[0] * scale_x),
            round(gold[1] * scale_y),
            round(gold[2] * scale_x),
            round(gold[3] * scale_y),
        ]
        back = [model_box[0] / scale_x, model_box[1] / scale_y, model_box[2] / scale_x, model_box[3] / scale_y]
        score = grounding.compute_score(_as_model_box(model_box, i % 3), gold, **meta)
        assert score["iou"] == pytest.approx(ref_iou(back, gold), abs=1e-9), row["id"]
        assert score["accuracy"] == 1.0 and score["iou"] > 0.9, (row["id"], score)
        assert score["format"] == float(i % 3 != 1)
        box_w = model_box[2] - model_box[0]
        shifted = [model_box[0] + box_w, model_box[1], model_box[2] + box_w, model_box[3]]
        moved = grounding.compute_score(_as_model_box(shifted, i % 3), gold, **meta)
        assert moved["accuracy"] == 0.0 and moved["iou"] < 0.05, (row["id"], moved)
    print(f"coco128_grounding ({coord_system}): {len(rows)} rows scored")
