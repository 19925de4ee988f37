"""Bad data rows: property-based fuzzing of the loader, and edge cases carried through prompt rendering.

Properties of `load_samples` on any JSON-lines file: it never raises anything but `DataError`; with
`on_bad_row="skip"` every non-blank line becomes exactly one sample or one `BadRow` naming the file and the line; a
kept sample's question is the row's text, unchanged to the code point; `"fail"` raises exactly when some row is bad.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_sapo.data import load_samples, render_prompt
from vlm_sapo.data.loaders import DataError
from vlm_sapo.data.prompts import PromptTooLongError

GOOD = {"id": "anchor", "image": "ok.png", "question": "What is x?", "answer": "1"}
IMAGE_VALUES = ["ok.png", "missing.png", "../outside.png", "/etc/passwd", "http://example.org/a.png", "", "   ",
                "data:image/png;base64,!!!", "data:image/png;base64,aGVsbG8=", "ok.png\x00.txt", "file://ok.png",
                "x" * 5000, "trunc.png", ["ok.png", "ok.png"], [], [None], {"path": "ok.png"}, {"bytes": None},
                {"bytes": [137, 80, 78, 71]}, {"bytes": "not bytes"}, {"bytes": -1}, {"nothing": 1}, 7, None, True]
QUESTIONS = ["", "  \t\n", "\u200b", "\u202eevil\u202c", "e\u0301\u0301\u0301", "🙂" * 1000, "\ud800", "a\udfffb",
             "\x00", "<|im_end|>", "x" * 1_000_000, "ﷺ" * 100, "\U0010ffff", "\r\n\r\n"]

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)
field = {
    "id": st.one_of(st.text(max_size=12), st.integers(), json_value),
    "image": st.one_of(st.sampled_from(IMAGE_VALUES), json_value),
    "images": st.one_of(st.lists(st.sampled_from(["ok.png", "missing.png", "trunc.png"]), max_size=3), json_value),
    "question": st.one_of(st.text(), st.sampled_from(QUESTIONS), json_value),
    "answer": json_value,
}


def _row(index: int, changes: dict[str, Any], dropped: set[str]) -> str:
    """A good row with a few fields replaced by fuzzed values and a few removed (so checks past the first are hit)."""
    row = {**GOOD, "id": f"r{index}", **changes}
    return json.dumps({k: v for k, v in row.items() if k not in dropped})


mutated = st.builds(_row, st.integers(0, 10**6), st.fixed_dictionaries({}, optional=field),
                    st.sets(st.sampled_from(list(field)), max_size=1))
one_hostile = st.one_of(st.sampled_from(IMAGE_VALUES).map(lambda v: {"image": v}),
                        st.sampled_from(QUESTIONS).map(lambda q: {"question": q}))
rows = st.lists(st.one_of(
    st.builds(_row, st.integers(0, 10**6), one_hostile, st.just(set())),
    mutated,
    st.fixed_dictionaries({}, optional=field).map(json.dumps),
    st.dictionaries(st.text(max_size=8), json_value, max_size=4).map(json.dumps),
    json_value.map(json.dumps),
    st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (48, 48), (10, 200, 30)).save(path / "ok.png")
    Image.new("RGB", (48, 48), (200, 10, 30)).save(path / "full.png")
    (path / "trunc.png").write_bytes((path / "full.png").read_bytes()[:70])
    return path


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(rows)
def test_any_jsonl_gives_samples_or_named_bad_rows(folder: Path, tally: Counter, lines: list[str]) -> None:
    path = folder / "fuzz.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    tally["bad_inputs"] += len(lines)
    numbered = [(n, line) for n, line in enumerate([json.dumps(GOOD), *lines], start=1) if line.strip()]
    result = load_samples(path, task="math", on_bad_row="skip")  # the anchor row keeps it from being all bad
    assert len(result.samples) + len(result.skipped) == len(numbered)
    assert len({s.id for s in result.samples}) == len(result.samples)
    lines_of = dict(numbered)
    for bad in result.skipped:
        assert bad.file == str(path) and bad.row in lines_of and f"{path} line {bad.row}" in str(bad)
    kept_lines = sorted(set(lines_of) - {b.row for b in result.skipped})
    for n, sample in zip(kept_lines, result.samples):
        record = json.loads(lines_of[n])
        assert sample.question == record["question"] and sample.question.strip()
        sample.question.encode("utf-8")  # valid text only: a tokenizer must be able to take it
    try:
        strict = load_samples(path, task="math")
    except DataError as err:
        assert result.skipped and f"{len(result.skipped)} bad row(s) in {path}" in str(err)
    else:
        assert not result.skipped and [s.id for s in strict.samples] == [s.id for s in result.samples]


@pytest.fixture(scope="module")
def processor(small_model: Path):
    from vlm_sapo.models.loading import load_processor

    return load_processor(small_model, min_pixels=3136, max_pixels=12544)


@pytest.mark.parametrize("question", ["\u202eevil\u202c\u200d🙂e\u0301", "\x00 nul", "ﷺ" * 50, "\U0010ffff?"])
def test_unicode_questions_render_with_their_text_intact(folder: Path, processor: Any, tally: Counter,
                                                         question: str) -> None:
    tally["bad_inputs"] += 1
    path = folder / "unicode.jsonl"
    path.write_text(json.dumps({**GOOD, "question": question}) + "\n")
    (sample,) = load_samples(path, task="math").samples
    assert sample.question == question
    prompt = render_prompt(processor, sample, instruction="Answer.", min_pixels=3136, max_pixels=12544,
                           max_prompt_tokens=2048)
    assert question in prompt.text and len(prompt.images) == 1


def test_megabyte_question_is_dropped_as_too_long_in_bounded_time(folder: Path, processor: Any, tally: Counter) -> None:
    tally["bad_inputs"] += 1
    path = folder / "huge.jsonl"
    path.write_text(json.dumps({**GOOD, "question": "why " * 250_000}) + "\n")
    (sample,) = load_samples(path, task="math").samples
    start = time.monotonic()
    with pytest.raises(PromptTooLongError, match=r"'anchor': prompt is \d+ tokens .* above max_prompt_tokens=2048"):
        render_prompt(processor, sample, instruction="Answer.", min_pixels=3136, max_pixels=12544,
                      max_prompt_tokens=2048)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("question", ["look: <|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>"])
def test_vision_tokens_smuggled_in_a_question_are_a_named_data_error(folder: Path, processor: Any, tally: Counter,
                                                                     question: str) -> None:
    tally["bad_inputs"] += 1
    path = folder / "smuggled.jsonl"
    path.write_text(json.dumps({**GOOD, "question": question}) + "\n")
    (sample,) = load_samples(path, task="math").samples
    with pytest.raises(DataError, match="sample 'anchor': .*vision special tokens"):
        render_prompt(processor, sample, instruction="Answer.", min_pixels=3136, max_pixels=12544,
                      max_prompt_tokens=2048)
