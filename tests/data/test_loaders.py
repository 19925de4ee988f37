"""Loading samples from JSON lines, Parquet and datasets folders, and rejecting every kind of bad row up front."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm_sapo.data import DataError, ImageRef, LoadResult, Sample, load_samples

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def draw(path: Path, size=(64, 48), colour=(200, 30, 30)) -> Path:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def png_bytes(size=(32, 32), colour=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_of(sample: Sample, k: int = 0) -> tuple[int, int, int]:
    img = sample.load_images()[k]
    return img.getpixel((img.width // 2, img.height // 2))


# ---- good data ----------------------------------------------------------------------------------------------------


def test_jsonl_with_column_mapping_and_meta(tmp_path):
    draw(tmp_path / "imgs" / "a.png", colour=(255, 0, 0))
    elsewhere = draw(tmp_path.parent / f"{tmp_path.name}_abs.png", colour=(0, 255, 0))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(colour=(0, 0, 255))).decode()
    rows = [
        {"uid": "q1", "picture": "imgs/a.png", "prompt": "What colour?", "label": "red", "choices": ["red", "blue"]},
        {"uid": 7, "picture": str(elsewhere), "prompt": "And this?", "label": [1, 2], "choices": []},
        {"uid": "q3", "picture": data_uri, "prompt": "Third?", "label": 0, "extra": {"k": 1}},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = load_samples(
        path, task="chart", columns={"id": "uid", "image": "picture", "question": "prompt", "answer": "label"}
    )
    assert isinstance(res, LoadResult) and res.skipped == []
    assert [s.id for s in res.samples] == ["q1", "7", "q3"]
    assert [s.answer for s in res.samples] == ["red", [1, 2], 0]
    assert all(s.task == "chart" for s in res.samples)
    assert res.samples[0].meta == {"choices": ["red", "blue"]}
    assert res.samples[2].meta == {"extra": {"k": 1}}
    assert all(isinstance(s.images[0], ImageRef) for s in res.samples)  # lazy
    assert res.samples[0].images[0].path == tmp_path / "imgs" / "a.png"
    assert [colour_of(s) for s in res.samples] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_jsonl_default_columns_generated_ids_image_root_and_multi_images(tmp_path):
    root = tmp_path / "pictures"
    draw(root / "x.png", colour=(255, 0, 0))
    draw(root / "sub" / "y.png", colour=(0, 0, 255))
    rows = [
        {"images": ["x.png", "sub/y.png"], "question": "Compare.", "answer": "x"},
        {"image": "sub/y.png", "question": "One.", "answer": "y"},
    ]
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "mix.jsonl", rows)
    res = load_samples(path, task="math", image_root=root)
    assert [s.id for s in res.samples] == ["mix:0", "mix:1"]
    assert len(res.samples[0].images) == 2 and len(res.samples[1].images) == 1
    assert [colour_of(res.samples[0], k) for k in (0, 1)] == [(255, 0, 0), (0, 0, 255)]
    assert res.samples[1].meta == {}
    assert len(load_samples(path, task="math", image_root=root, limit=1).samples) == 1


def test_parquet_with_bytes_and_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    draw(tmp_path / "p.png", colour=(0, 255, 0))
    table = pa.table(
        {
            "question": ["bytes?", "path?", "both?"],
            "answer": ["1", "2", "3"],
            "image": [
                {"bytes": png_bytes(colour=(0, 0, 255)), "path": "ignored.png"},
                {"bytes": None, "path": "p.png"},
                {"bytes": png_bytes(colour=(255, 0, 0)), "path": None},
            ],
            "score": [0.5, 1.5, 2.5],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    res = load_samples(tmp_path / "train.parquet", task="chart")
    assert [s.id for s in res.samples] == ["train:0", "train:1", "train:2"]
    assert [colour_of(s) for s in res.samples] == [(0, 0, 255), (0, 255, 0), (255, 0, 0)]
    assert res.samples[1].images[0].path == tmp_path / "p.png"
    assert [s.meta["score"] for s in res.samples] == [0.5, 1.5, 2.5]
    with pytest.raises(DataError, match=r"mapped columns not found: question -> 'phrase'.*columns are"):
        load_samples(tmp_path / "train.parquet", task="chart", columns={"question": "phrase"})


def _pil(colour) -> Image.Image:
    return Image.new("RGB", (30, 20), colour)


def test_datasets_saved_folder_dict_and_arrow(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "imgs": datasets.Sequence(datasets.Image()),
            "q": datasets.Value("string"),
            "a": datasets.Value("int64"),
            "note": datasets.Value("string"),
        }
    )
    train = datasets.Dataset.from_dict(
        {
            "id": ["t0", "t1"],
            "imgs": [[_pil((255, 0, 0)), _pil((0, 255, 0))], [_pil((0, 0, 255))]],
            "q": ["two images", "one image"],
            "a": [2, 1],
            "note": ["n0", "n1"],
        },
        features=features,
    )
    test = datasets.Dataset.from_dict(
        {"id": ["v0"], "imgs": [[_pil((9, 9, 9))]], "q": ["held out"], "a": [5], "note": ["n"]}, features=features
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    cols = {"images": "imgs", "question": "q", "answer": "a"}

    res = load_samples(tmp_path / "dd", task="count", columns=cols, split="train")
    assert [s.id for s in res.samples] == ["t0", "t1"]
    assert [len(s.images) for s in res.samples] == [2, 1]
    assert [colour_of(res.samples[0], k) for k in (0, 1)] == [(255, 0, 0), (0, 255, 0)]
    assert res.samples[0].answer == 2 and res.samples[0].meta == {"note": "n0"}
    assert load_samples(tmp_path / "dd", task="count", columns=cols, split="test").samples[0].id == "v0"
    with pytest.raises(DataError, match=r"splits \['test', 'train'\]; pass split="):
        load_samples(tmp_path / "dd", task="count", columns=cols)

    train.save_to_disk(str(tmp_path / "single"))
    assert len(load_samples(tmp_path / "single", task="count", columns=cols).samples) == 2
    arrow = sorted((tmp_path / "single").glob("*.arrow"))
    assert len(arrow) == 1
    res = load_samples(arrow[0], task="count", columns=cols)
    assert colour_of(res.samples[1]) == (0, 0, 255)


def test_hub_style_parquet_folder(tmp_path):
    import datasets

    def make(n, colour):
        return datasets.Dataset.from_dict(
            {"image": [_pil(colour)] * n, "question": [f"q{i}" for i in range(n)], "answer": list(range(n))},
            features=datasets.Features(
                {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("int64")}
            ),
        )

    (tmp_path / "hub" / "data").mkdir(parents=True)
    make(3, (255, 0, 0)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet"))
    make(2, (0, 255, 0)).to_parquet(str(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet"))
    make(1, (0, 0, 255)).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    res = load_samples(tmp_path / "hub", task="t", split="train")
    assert [s.id for s in res.samples] == [f"hub:{i}" for i in range(5)]
    assert [colour_of(s) for s in res.samples] == [(255, 0, 0)] * 3 + [(0, 255, 0)] * 2
    assert colour_of(load_samples(tmp_path / "hub", task="t", split="test").samples[0]) == (0, 0, 255)
    with pytest.raises(DataError, match="has no split 'dev'"):
        load_samples(tmp_path / "hub", task="t", split="dev")

    (tmp_path / "flat" / "train").mkdir(parents=True)
    make(2, (255, 0, 0)).to_parquet(str(tmp_path / "flat" / "train" / "0000.parquet"))
    make(1, (0, 0, 255)).to_parquet(str(tmp_path / "flat" / "validation.parquet"))
    assert len(load_samples(tmp_path / "flat", task="t", split="train").samples) == 2
    assert colour_of(load_samples(tmp_path / "flat", task="t", split="validation").samples[0]) == (0, 0, 255)
    with pytest.raises(DataError, match=r"splits \['train', 'validation'\]; pass split="):
        load_samples(tmp_path / "flat", task="t")


def test_real_shared_benchmark_files_all_load():
    root = SHARED_DATA.resolve()
    if not root.is_dir():
        pytest.skip(f"SKIPPED LOUDLY: shared benchmark data not found at {root} (expected <repo>/../shared/data)")
    geo = load_samples(root / "geometry3k" / "geometry3k_test_300.jsonl", task="math")
    expected = sum(1 for line in (root / "geometry3k" / "geometry3k_test_300.jsonl").open() if line.strip())
    assert len(geo.samples) == expected == 300 and geo.skipped == []
    first = geo.samples[0]
    assert first.answer in "ABCD" and len(first.meta["choices"]) == 4
    assert first.load_images()[0].size == (first.meta["image_width"], first.meta["image_height"])

    for name, rows in (("grounding.jsonl", 164), ("grounding_all.jsonl", 216)):
        coco = load_samples(
            root / "coco128_grounding" / name, task="grounding", columns={"question": "phrase", "answer": "bbox"}
        )
        assert len(coco.samples) == rows and coco.skipped == []
    s = coco.samples[0]
    assert len(s.answer) == 4 and {"image_width", "image_height", "category"} <= set(s.meta)
    assert s.load_images()[0].size == (s.meta["image_width"], s.meta["image_height"])


# ---- bad rows -----------------------------------------------------------------------------------------------------


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _noise(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _bad_files(folder: Path) -> None:
    (folder / "empty.png").write_bytes(b"")
    png, jpg = _noise("PNG"), _noise("JPEG")
    (folder / "trunc.png").write_bytes(png[: len(png) // 2])
    (folder / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "bomb.png").write_bytes(_png_declaring(50_000, 50_000))
    Image.new("RGB", (402, 2)).save(folder / "thin.png")
    draw(folder / "ok.png")


# (row, expected column, expected problem) -- the line number is the row's position + 2 (line 1 is a good row).
BAD_ROWS = [
    ({"id": "r1", "image": "empty.png", "question": "q", "answer": 1}, "image", "empty (0 bytes)"),
    ({"id": "r2", "image": "trunc.png", "question": "q", "answer": 1}, "image", "truncated"),
    ({"id": "r3", "image": "trunc.jpg", "question": "q", "answer": 1}, "image", "truncated"),
    ({"id": "r4", "image": "bomb.png", "question": "q", "answer": 1}, "image", "decompression-bomb"),
    ({"id": "r5", "image": "thin.png", "question": "q", "answer": 1}, "image", "aspect ratio 201.0"),
    ({"id": "r6", "image": "../../etc/passwd", "question": "q", "answer": 1}, "image", "escapes the data folder"),
    ({"id": "r7", "image": "ok.png", "answer": 1}, "question", "missing required field 'question'"),
    ({"id": "r8", "image": "ok.png", "question": "q"}, "answer", "missing required field 'answer'"),
    ({"id": "r9", "question": "q", "answer": 1}, "image", "missing required field 'images'"),
    ({"id": "r10", "image": "ok.png", "question": "   ", "answer": 1}, "question", "question is empty"),
    ({"id": "r11", "image": "ok.png", "question": 42, "answer": 1}, "question", "must be a string, got int"),
    ({"id": "r12", "image": "nope.png", "question": "q", "answer": 1}, "image", "image file not found"),
    ({"id": "r13", "images": ["ok.png", "trunc.png"], "question": "q", "answer": 1}, "images[1]", "truncated"),
    ({"id": "r14", "images": [], "question": "q", "answer": 1}, "images", "image list is empty"),
    ({"id": "r15", "image": "http://x.org/a.png", "question": "q", "answer": 1}, "image", "URLs are not fetched"),
    ('{"id": "r16", "image": ', None, "invalid JSON"),
    ({"id": "r17", "images": ["ok.png", "ok.png"], "question": "a <image> b", "answer": 1}, "question",
     "question has 1 '<image>' placeholder(s) for 2 image(s)"),
    ({"id": "ok", "image": "ok.png", "question": "again", "answer": 1}, "id", "duplicate id 'ok' (first at line 1)"),
    ({"id": "", "image": "ok.png", "question": "q", "answer": 1}, "id", "id is empty"),
]


@pytest.mark.parametrize("k", range(len(BAD_ROWS)), ids=[str(r[2]) for r in BAD_ROWS])
def test_each_bad_row_names_file_line_column_and_problem(tmp_path, k):
    _bad_files(tmp_path)
    good = {"id": "ok", "image": "ok.png", "question": "fine", "answer": 0}
    row, column, problem = BAD_ROWS[k]
    path = write_jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_samples(path, task="t")
    message = str(info.value)
    assert f"{path} line 2" in message and problem in message
    if column:
        assert f"column '{column}'" in message
    assert "1 bad row(s)" in message
    skipped = load_samples(path, task="t", on_bad_row="skip")
    assert [s.id for s in skipped.samples] == ["ok"]
    assert [(b.row, b.column) for b in skipped.skipped] == [(2, column)]
    assert problem in skipped.skipped[0].problem


def test_fail_lists_first_rows_and_counts_all_skip_counts_them(tmp_path):
    _bad_files(tmp_path)
    good = {"id": "ok", "image": "ok.png", "question": "fine", "answer": 0}
    path = write_jsonl(tmp_path / "all.jsonl", [good, ""] + [r for r, _, _ in BAD_ROWS])  # line 2 is blank
    with pytest.raises(DataError) as info:
        load_samples(path, task="t")
    assert len(info.value.bad_rows) == len(BAD_ROWS)
    message = str(info.value)
    assert message.startswith(f"{len(BAD_ROWS)} bad row(s) in {path}")
    assert f"... and {len(BAD_ROWS) - 5} more" in message and "line 3" in message and "line 8" not in message
    res = load_samples(path, task="t", on_bad_row="skip")
    assert len(res.samples) == 1 and len(res.skipped) == len(BAD_ROWS)
    assert [b.row for b in res.skipped] == list(range(3, 3 + len(BAD_ROWS)))


def test_absolute_paths_only_when_allowed_and_all_bad_is_an_error(tmp_path):
    img = draw(tmp_path / "abs.png")
    path = write_jsonl(tmp_path / "a.jsonl", [{"image": str(img), "question": "q", "answer": 1}])
    assert len(load_samples(path, task="t").samples) == 1
    with pytest.raises(DataError, match="absolute image path not allowed"):
        load_samples(path, task="t", allow_absolute_paths=False)
    with pytest.raises(DataError, match=r"no usable samples.*all 1 rows are bad"):
        load_samples(path, task="t", allow_absolute_paths=False, on_bad_row="skip")


def test_parquet_bad_row_names_row_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": ["ok", "", "ok too"],
            "answer": [1, 2, 3],
            "image": [png_bytes(), png_bytes(), _noise("PNG")[:100]],
        }
    )
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "b.parquet", task="t")
    rows = [(b.row, b.column) for b in info.value.bad_rows]
    assert rows == [(1, "question"), (2, "image")]
    assert f"{tmp_path / 'b.parquet'} row 1, column 'question': question is empty" in str(info.value)
