"""The rules of each built-in reward, case by case, against expectations computed here."""

from __future__ import annotations

import pytest

from rewards import chart, grounding, length_penalty, math
from rewards import format as fmt
from tests.scoring.reward_helpers import as_model, ref_iou


# ---------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>5</answer>", 1.0),
        ("  <think>\n</think>\n\n<answer> 5 </answer>\n ", 1.0),  # empty thinking is fine, whitespace anywhere
        ("<think>a</think><answer></answer>", 0.0),  # an empty answer is never paid
        ("<think>a</think><answer>  \n </answer>", 0.0),
        ("<answer>5</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think><answer>5</answer> and more", 0.0),  # text after </answer>
        ("preamble <think>a</think><answer>5</answer>", 0.0),
        ("<think>a</think><answer>5</answer><answer>6</answer>", 0.0),  # two answers
        ("<think>a<think>b</think><answer>5</answer>", 0.0),
        ("<answer>5</answer>", 0.0),  # no thinking block
        ("<think>a</think>5", 0.0),
    ],
)
def test_format_rule(completion, expected):
    assert fmt.compute_score(completion) == {"overall": expected, "format": expected}


def test_extract_answer_and_boxed():
    assert fmt.extract_answer("<answer>1</answer> x <answer> 2 </answer>") == "2"
    assert fmt.extract_answer("no tags") is None
    assert fmt.last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert fmt.last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced: no guess


# ------------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        (r"\sqrt{12}", r"2\sqrt{3}"),
        (r"2 \sqrt 3", r"2 \sqrt { 3 }"),
        (r"2\pi", r"2 \pi"),
        ("2π", r"2\pi"),
        (r"60^\circ", "60"),
        ("60°", "60"),
        (r"12\text{ cm}", "12"),
        ("12 cm", "12"),
        ("12,000", "12000"),
        (r"\$5", "5"),
        (r"$\frac{40}{3}$", r"\frac { 40 } { 3 }"),
    ],
)
def test_math_equivalences(answer, gold):
    score = math.compute_score(as_model(answer), gold)
    assert score == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}, (answer, gold)


@pytest.mark.parametrize(("answer", "gold"), [("0.51", "0.5"), (r"\sqrt{13}", r"2\sqrt{3}"), ("3", "4"), ("61", "60")])
def test_math_non_equivalences(answer, gold):
    assert math.compute_score(as_model(answer), gold)["accuracy"] == 0.0


def test_math_answer_sources_and_weighting():
    assert math.compute_score(r"so the answer is \boxed{7}", "7") == pytest.approx(
        {"overall": 0.9, "accuracy": 1.0, "format": 0.0}
    )
    assert math.compute_score(as_model(r"x = \boxed{7}"), "7")["accuracy"] == 1.0
    assert math.compute_score(as_model(""), "7") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert math.compute_score("<think>7</think><answer>8</answer>", "7") == pytest.approx(
        {"overall": 0.1, "accuracy": 0.0, "format": 1.0}
    )
    assert math.compute_score("the answer is 7", "7")["accuracy"] == 0.0  # no tags, no box: no answer


def test_multiple_choice_forms():
    choices = ["30", "60", "120", "240"]
    for form in ["B", "(B)", "B.", "B)", "B: 60", "B. 60", "60", "60.0", r"\boxed{B}"]:
        assert math.compute_score(as_model(form), "B", choices=choices)["accuracy"] == 1.0, form
    for form in ["A", "(C)", "120", "b", "B60", ""]:
        assert math.compute_score(as_model(form), "B", choices=choices)["accuracy"] == 0.0, form
    # the letter decides, even when the value written after it belongs to another choice
    assert math.compute_score(as_model("B. 120"), "B", choices=choices)["accuracy"] == 1.0
    # duplicate choice values: the value answer is right when the gold choice holds it
    assert math.compute_score(as_model("52"), "C", choices=["38", "52", "52", "62"])["accuracy"] == 1.0


def test_we_math_options_string():
    options = "A. 10cm²;   B. 20cm²;   C. 30cm²; D. No correct answer"
    assert math.parse_options(options) == {"A": "10cm²", "B": "20cm²", "C": "30cm²", "D": "No correct answer"}
    assert math.compute_score(as_model("20cm²"), "B", options=options)["accuracy"] == 1.0
    assert math.compute_score(as_model("10cm²"), "B", options=options)["accuracy"] == 0.0
    # values that hold ';' or look like a following letter stay whole
    tricky = "A. ①; ③;B. ②; ③;C. ②; ④; E. No correct answer"
    assert math.parse_options(tricky)["A"] == "①; ③"
    # options whose values are letters: a bare letter is read as the choice letter
    letters = "A. B; B. C; C. D; D. E; E. No correct answer"
    assert math.compute_score(as_model("C"), "C", options=letters)["accuracy"] == 1.0
    assert math.compute_score(as_model("D"), "C", options=letters)["accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------------- chart
def _within_5_percent(pred: float, label: float) -> bool:
    return pred == label if label == 0 else abs(pred - label) / abs(label) <= 0.05


@pytest.mark.parametrize("label", [20.0, 0.03, -2.0, 4900.0, 17.4, 1.0])
@pytest.mark.parametrize("factor", [0.94, 0.951, 1.0, 1.049, 1.06, 1.2])
def test_chart_relaxed_accuracy_boundary(label, factor):
    pred = label * factor
    expected = float(_within_5_percent(pred, label))
    assert chart.compute_score(as_model(repr(pred)), repr(label))["accuracy"] == expected, (pred, label)


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("12,345", "12345", 1.0),  # thousands separators
        ("1,234,567.5", "1234567.5", 1.0),
        ("1,2", "12", 0.0),  # not a thousands separator: text, and text differs
        ("45%", "45", 1.0),  # '%' dropped, not divided by 100
        ("45 %", "45", 1.0),
        ("0.45", "45%", 0.0),
        ("12 million", "12", 1.0),  # trailing unit dropped
        ("3 years", "3", 1.0),
        ("$5", "5", 1.0),
        ("−2", "-2", 1.0),  # unicode minus
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),  # a label of 0 needs exactly 0
        ("1200000", "1.2M", 0.0),  # scale words are not applied
        ("japan ", "Japan", 1.0),
        ("Deaths from cancer.", "deaths from cancer", 1.0),
        ("Men,  Women", "Men, Women", 1.0),
        ("Men", "Men, Women", 0.0),
        ("4 by 3", "4 by 3", 1.0),
        ("4", "4 by 3", 0.0),
        ("", "5", 0.0),
    ],
)
def test_chart_rules(answer, label, expected):
    assert chart.compute_score(as_model(answer), label)["accuracy"] == expected


def test_chart_answer_line_fallback_and_weighting():
    assert chart.compute_score("The bars show it.\nAnswer: 42", "42") == pytest.approx(
        {"overall": 0.9, "accuracy": 1.0, "format": 0.0}
    )
    assert chart.compute_score("no answer here", "42")["accuracy"] == 0.0
    assert chart.compute_score(as_model("7"), ["6", "7"])["accuracy"] == 1.0  # any of several labels


# ------------------------------------------------------------------------------------------------- grounding
def test_grounding_conversions_against_reference():
    gold = [100.0, 50.0, 300.0, 250.0]
    size = {"image_size": (640, 480)}
    pred = [110, 60, 320, 240]
    want = ref_iou(pred, gold)
    got = grounding.compute_score(as_model(str(pred)), gold, coord_system="abs_original", **size)
    assert got["iou"] == pytest.approx(want) and got["accuracy"] == float(want >= 0.5)
    rel = [round(v * 1000 / d) for v, d in zip(pred, (640, 480, 640, 480))]
    back = [v * d / 1000 for v, d in zip(rel, (640, 480, 640, 480))]
    got = grounding.compute_score(as_model(str(rel)), gold, coord_system="rel1000", **size)
    assert got["iou"] == pytest.approx(ref_iou(back, gold))
    resized = [v / 2 for v in pred]
    got = grounding.compute_score(
        as_model(str(resized)), gold, coord_system="abs_resized", model_input_size=(320, 240), **size
    )
    assert got["iou"] == pytest.approx(want)
    assert got["overall"] == pytest.approx(0.9 * want + 0.1)


def test_grounding_degenerate_and_outside_boxes():
    gold = [0.0, 0.0, 100.0, 100.0]
    meta = {"coord_system": "abs_original", "image_size": (200, 100)}
    assert grounding.compute_score(as_model("[50, 50, 50, 80]"), gold, **meta)["iou"] == 0.0  # zero width
    assert grounding.compute_score(as_model("[80, 80, 20, 20]"), gold, **meta)["iou"] == 0.0  # reversed corners
    assert grounding.compute_score(as_model("[300, 0, 400, 50]"), gold, **meta)["iou"] == 0.0  # wholly outside
    # reaching outside is clipped first: [-50, -50, 100, 100] becomes the gold box itself
    assert grounding.compute_score(as_model("[-50, -50, 100, 100]"), gold, **meta)["iou"] == pytest.approx(1.0)
    assert grounding.compute_score(as_model("no box"), gold, **meta)["iou"] == 0.0
    assert grounding.compute_score(as_model("[nan, 1, 2, 3]"), gold, **meta)["iou"] == 0.0


def test_grounding_bad_meta_names_the_key():
    with pytest.raises(ValueError, match="coord_system"):
        grounding.compute_score(as_model("[1, 1, 5, 5]"), [0, 0, 5, 5], image_size=(10, 10))
    with pytest.raises(ValueError, match="model_input_size"):
        grounding.compute_score(as_model("[1, 1, 5, 5]"), [0, 0, 5, 5], image_size=(10, 10), coord_system="abs_resized")
    with pytest.raises(ValueError, match="image_size"):
        grounding.compute_score(as_model("[1, 1, 5, 5]"), [0, 0, 5, 5], coord_system="rel1000")
    with pytest.raises(ValueError, match="ground truth"):
        grounding.compute_score(as_model("[1, 1, 5, 5]"), "a box", image_size=(10, 10), coord_system="rel1000")


# -------------------------------------------------------------------------------------- the example user reward
def test_length_penalty_example():
    assert length_penalty.compute_score("x" * 100, max_chars=200) == {"overall": 0.0, "penalty": 0.0}
    assert length_penalty.compute_score("x" * 300, max_chars=200) == {"overall": -0.5, "penalty": 0.5}
    assert length_penalty.compute_score("x" * 900, max_chars=200) == {"overall": -1.0, "penalty": 1.0}
