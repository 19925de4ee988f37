"""Reading samples from JSON lines, Parquet and `datasets` folders, with every row validated before training starts.

A bad row (missing field, empty question, missing/truncated/oversized image or video, a path escaping the data folder,
...) is found here, up front, and reported with its file, row and column (a video's frame as `video[k]`):
`on_bad_row="fail"` raises one `DataError` listing the first few (all counted); `"skip"` returns them in
`LoadResult.skipped`. Each image (and video) is fully decoded once during validation and then closed; samples keep
lazy `ImageRef`s (`VideoRef`s).

Image paths: relative paths resolve against `image_root` or else the data file's folder (for a dataset folder,
that folder) and must stay inside it after normalising `..` (checked on the path text, so a symlinked cache layout
such as the Hugging Face hub's still works). Absolute paths are allowed unless `allow_absolute_paths=False`. URLs are
rejected (download first); `data:image/...;base64,` URIs and raw bytes (e.g. the `datasets` `Image` feature's
`{"bytes": ..., "path": ...}`) are decoded in place.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlm_sapo.data.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageError,
    ImageRef,
    open_image,
)
from vlm_sapo.data.sample import IMAGE_PLACEHOLDER, Sample
from vlm_sapo.data.videos import VideoError, VideoRef, probe_video_file

FIELDS = ("id", "images", "question", "answer", "video")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_LISTED = 5


@dataclass(frozen=True)
class BadRow:
    """One rejected row: where it is and what is wrong with it."""

    file: str
    row: int  # 1-based line number for JSON lines, 0-based row index otherwise
    column: str | None
    problem: str
    is_line: bool = False

    def __str__(self) -> str:
        where = f"line {self.row}" if self.is_line else f"row {self.row}"
        col = f", column '{self.column}'" if self.column else ""
        return f"{self.file} {where}{col}: {self.problem}"


class DataError(ValueError):
    """The data cannot be used as given; `bad_rows` holds every rejected row when rows are to blame."""

    def __init__(self, message: str, bad_rows: list[BadRow] | None = None):
        super().__init__(message)
        self.bad_rows = list(bad_rows or [])


@dataclass
class LoadResult:
    samples: list[Sample]
    skipped: list[BadRow]


@dataclass
class _RawRow:
    file: Path
    row: int
    is_line: bool
    record: dict[str, Any] | None
    error: str | None = None


class _RowError(Exception):
    def __init__(self, column: str | None, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


def load_samples(
    path: str | os.PathLike,
    *,
    task: str,
    columns: dict[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    limit: int | None = None,
    on_bad_row: Literal["fail", "skip"] = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    min_side: int = DEFAULT_MIN_SIDE,
    allow_absolute_paths: bool = True,
) -> LoadResult:
    """Load and validate every row of `path` (a .jsonl/.ndjson or .parquet/.arrow file, or a folder).

    `columns` maps project fields (`id`, `images` or `image`, `question`, `answer`, `video`) to source column names;
    unmapped fields use their own name (`images`, else `image`). A row needs images, a `video` (a list of frames or a
    video file, see `vlm_sapo.data.videos`), or both. Every other column goes to `Sample.meta`. Without an id
    column, id = "<file stem>:<row index>". `limit` caps the rows read (good or bad), not the samples kept.
    """
    if on_bad_row not in ("fail", "skip"):
        raise ValueError(f"on_bad_row must be 'fail' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    columns = dict(columns or {})
    if "image" in columns:
        if "images" in columns:
            raise ValueError("columns maps both 'image' and 'images'; give one")
        columns["images"] = columns.pop("image")
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise ValueError(f"columns has unknown project fields {sorted(unknown)}; known: {list(FIELDS)} (or 'image')")

    src = Path(path)
    if not src.exists() and not _HUB_ID.match(str(path)):
        raise DataError(f"data path not found: {src}")
    base = Path(os.path.abspath(image_root if image_root is not None else (src if src.is_dir() else src.parent)))
    rows, schema = _open_rows(src, split) if src.exists() else _hub_rows(str(path), split)
    if schema is not None:
        missing = [f"{field} -> '{col}'" for field, col in columns.items() if col not in schema]
        if missing:
            raise DataError(f"{src}: mapped columns not found: {', '.join(missing)}; columns are {sorted(schema)}")

    limits = dict(max_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio, min_side=min_side)
    checked: dict[Path, str | None] = {}  # each image file is decoded once even when many rows share it
    videos: dict[Path, VideoRef | str] = {}  # each video file too (its probe, or the problem found)
    samples: list[Sample] = []
    bad: list[BadRow] = []
    seen_ids: dict[str, str] = {}
    stem = src.stem if src.is_file() else src.name
    for index, raw in enumerate(rows):
        if limit is not None and index >= limit:
            break
        try:
            if raw.error is not None or raw.record is None:
                raise _RowError(None, raw.error or "empty row")
            sample = _build_sample(raw.record, index, stem, task, columns, base, allow_absolute_paths, limits, checked,
                                   videos)
            where = f"line {raw.row}" if raw.is_line else f"row {raw.row}"
            if sample.id in seen_ids:
                raise _RowError(columns.get("id", "id"), f"duplicate id {sample.id!r} (first at {seen_ids[sample.id]})")
            seen_ids[sample.id] = where
            samples.append(sample)
        except _RowError as err:
            bad.append(BadRow(str(raw.file), raw.row, err.column, err.problem, raw.is_line))

    if bad and on_bad_row == "fail":
        listed = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{len(bad)} bad row(s) in {src} (on_bad_row='skip' skips them):\n{listed}{more}", bad)
    if not samples:
        detail = f"; all {len(bad)} rows are bad, first: {bad[0]}" if bad else ""
        raise DataError(f"no usable samples in {src}{detail}", bad)
    return LoadResult(samples, bad)


def _build_sample(record: dict[str, Any], index: int, stem: str, task: str, columns: dict[str, str], base: Path,
                  allow_absolute: bool, limits: dict[str, Any], checked: dict[Path, str | None],
                  videos: dict[Path, VideoRef | str]) -> Sample:
    id_col = columns.get("id", "id")
    image_col = columns.get("images") or ("images" if "images" in record else "image")
    question_col = columns.get("question", "question")
    answer_col = columns.get("answer", "answer")
    video_col = columns.get("video", "video")

    if id_col in record:
        sid = record[id_col]
        if isinstance(sid, bool) or not isinstance(sid, (str, int)):
            raise _RowError(id_col, f"id must be a string or integer, got {type(sid).__name__}")
        sid = str(sid).strip()
        if not sid:
            raise _RowError(id_col, "id is empty")
    elif "id" in columns:
        raise _RowError(id_col, "missing required field 'id'")
    else:
        sid = f"{stem}:{index}"

    if question_col not in record or record[question_col] is None:
        raise _RowError(question_col, "missing required field 'question'")
    question = record[question_col]
    if not isinstance(question, str):
        raise _RowError(question_col, f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise _RowError(question_col, "question is empty")
    try:
        question.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) would break the tokenizer mid-run
    except UnicodeEncodeError as err:
        raise _RowError(question_col,
                        f"question is not valid Unicode text ({err.reason} at position {err.start})") from None

    if answer_col not in record or record[answer_col] is None:
        raise _RowError(answer_col, "missing required field 'answer'")

    has_video = record.get(video_col) is not None
    if (image_col not in record or record[image_col] is None) and not has_video:
        raise _RowError(image_col, "missing required field 'images' (or 'image', or 'video')")
    value = record.get(image_col)
    items = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    if not items and not has_video:
        raise _RowError(image_col, "image list is empty")
    refs = []
    for k, item in enumerate(items):
        col = f"{image_col}[{k}]" if isinstance(value, (list, tuple)) else image_col
        try:
            ref = _image_ref(item, base, allow_absolute, limits["max_pixels"])
            _check_image(ref, limits, checked)
        except ImageError as err:
            raise _RowError(col, str(err)) from err
        refs.append(ref)

    placeholders = question.count(IMAGE_PLACEHOLDER)  # see `vlm_sapo.data.prompts.user_content`
    if placeholders and placeholders != len(refs):
        raise _RowError(question_col, f"question has {placeholders} '<image>' placeholder(s) for {len(refs)} "
                                      "image(s); give one per image, or none (images then come first)")
    video = _video_ref(record[video_col], video_col, base, allow_absolute, limits, videos) if has_video else None
    used = {id_col, image_col, question_col, answer_col, video_col}
    meta = {k: v for k, v in record.items() if k not in used}
    return Sample(id=sid, task=task, images=refs, question=question, answer=record[answer_col], meta=meta, video=video)


def _video_ref(value: Any, col: str, base: Path, allow_absolute: bool, limits: dict[str, Any],
               videos: dict[Path, VideoRef | str]) -> VideoRef:
    """A list of frames (each checked as an image, all one size) or a video file (probed once per file)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise _RowError(col, "video frame list is empty")
        frames, size = [], None
        for k, item in enumerate(value):
            try:
                ref = _image_ref(item, base, allow_absolute, limits["max_pixels"])
                with open_image(ref, **limits) as img:
                    if size is not None and img.size != size:
                        raise ImageError(f"frame {k} is {img.width}x{img.height}, frame 0 is {size[0]}x{size[1]}: a "
                                         "video's frames must share one size")
                    size = img.size
            except ImageError as err:
                raise _RowError(f"{col}[{k}]", str(err)) from err
            frames.append(ref)
        return VideoRef(frames=tuple(frames), max_pixels=limits["max_pixels"], num_frames=len(frames))
    if not isinstance(value, str):
        raise _RowError(col, f"video must be a file path or a list of frames, got {type(value).__name__}")
    try:
        ref = _image_ref(value, base, allow_absolute, limits["max_pixels"])  # the same path rules as images
    except ImageError as err:
        raise _RowError(col, str(err).replace("image", "video")) from err
    if ref.path is None:
        raise _RowError(col, "video must be a file path or a list of frames, not inline data")
    try:
        if ref.path not in videos:
            try:
                videos[ref.path] = probe_video_file(ref.path, **limits)
            except VideoError as err:
                videos[ref.path] = str(err)
        probed = videos[ref.path]
        if isinstance(probed, str):
            raise VideoError(probed)
        return probed
    except VideoError as err:
        raise _RowError(col, str(err)) from err


def _image_ref(item: Any, base: Path, allow_absolute: bool, max_pixels: int) -> ImageRef:
    if isinstance(item, dict):  # datasets' Image feature: bytes win, path is a fallback (often just a file name)
        if item.get("bytes"):
            if not isinstance(item["bytes"], (bytes, bytearray, memoryview)):  # JSON can say {"bytes": 10**10}
                raise ImageError(f"image 'bytes' must be bytes, got {type(item['bytes']).__name__}")
            return ImageRef(data=bytes(item["bytes"]), max_pixels=max_pixels)
        if item.get("path"):
            return _image_ref(str(item["path"]), base, allow_absolute, max_pixels)
        raise ImageError("image dict has neither 'bytes' nor 'path'")
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not item:
            raise ImageError("image bytes are empty")
        return ImageRef(data=bytes(item), max_pixels=max_pixels)
    if not isinstance(item, str):
        raise ImageError(f"image must be a path, bytes or a {{'bytes','path'}} dict, got {type(item).__name__}")
    text = item.strip()
    if not text:
        raise ImageError("image path is empty")
    if text.startswith(("http://", "https://")):
        raise ImageError(f"image URLs are not fetched (download the data first): {text}")
    if text.startswith("data:image"):
        _, sep, payload = text.partition("base64,")
        try:
            if not sep:
                raise binascii.Error("not base64-encoded")
            return ImageRef(data=base64.b64decode(payload, validate=True), max_pixels=max_pixels)
        except binascii.Error as err:
            raise ImageError(f"bad data: URI ({err})") from err
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "\x00" in text:
        raise ImageError("image path contains a NUL byte")
    p = Path(text)
    if p.is_absolute():
        if not allow_absolute:
            raise ImageError(f"absolute image path not allowed (allow_absolute_paths=False): {text}")
        return ImageRef(path=p, max_pixels=max_pixels)
    resolved = Path(os.path.normpath(base / p))
    if resolved != base and base not in resolved.parents:
        raise ImageError(f"image path {text!r} escapes the data folder {base}")
    return ImageRef(path=resolved, max_pixels=max_pixels)


def _check_image(ref: ImageRef, limits: dict[str, Any], checked: dict[Path, str | None]) -> None:
    if ref.path is not None and ref.path in checked:
        if checked[ref.path] is not None:
            raise ImageError(checked[ref.path])
        return
    problem = None
    try:
        open_image(ref, **limits).close()
    except ImageError as err:
        problem = str(err)
    if ref.path is not None:
        checked[ref.path] = problem
    if problem is not None:
        raise ImageError(problem)


# ---- row sources -----------------------------------------------------------------------------------------------


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_rows(repo_id: str, split: str | None) -> tuple[Iterator[_RawRow], set[str]]:
    """A dataset on the Hugging Face hub (`owner/name`, `split` default "train"); images stay undecoded bytes."""
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split or "train")
    except Exception as err:  # offline, unknown id, missing split: one clear message, not a stack of hub internals
        offline = " (HF_HUB_OFFLINE is set: download it elsewhere and give its folder)" if os.environ.get(
            "HF_HUB_OFFLINE", "0") not in ("0", "") else ""
        raise DataError(f"{repo_id}: not a local path, and loading it from the hub failed{offline}: "
                        f"{type(err).__name__}: {err}") from None
    return _dataset_rows(ds, Path(repo_id))


def _open_rows(src: Path, split: str | None) -> tuple[Iterator[_RawRow], set[str] | None]:
    """Rows of the source, plus its column names when the format has a schema (JSON lines has none)."""
    if src.is_file():
        suffix = src.suffix.lower()
        if split is not None:
            raise ValueError(f"split={split!r} applies to dataset folders, not to the single file {src}")
        if suffix in JSONL_SUFFIXES:
            return _jsonl_rows(src), None
        if suffix == ".parquet":
            return _parquet_rows([src]), _parquet_schema([src])
        if suffix == ".arrow":
            return _dataset_rows(_arrow_dataset([src]), src)
        raise DataError(f"{src}: unsupported file type {suffix!r}; use .jsonl, .ndjson, .parquet, .arrow or a folder")
    if (src / "dataset_dict.json").exists() or (src / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick(ds, split, src)
        elif split is not None:
            raise ValueError(f"split={split!r} given but {src} holds a single Dataset, not a DatasetDict")
        return _dataset_rows(ds, src)
    parquet = sorted(src.rglob("*.parquet"))
    if parquet:
        files = _split_files(parquet, split, src)
        return _parquet_rows(files), _parquet_schema(files)
    arrow = sorted(src.rglob("*.arrow"))
    if arrow:
        return _dataset_rows(_arrow_dataset(_split_files(arrow, split, src)), src)
    raise DataError(f"{src}: folder holds no saved dataset (dataset_dict.json/state.json), .parquet or .arrow files")


def _pick(splits: dict[str, Any], split: str | None, src: Path) -> Any:
    if split is None:
        if len(splits) != 1:
            raise DataError(f"{src} has splits {sorted(splits)}; pass split=")
        return next(iter(splits.values()))
    if split not in splits:
        raise DataError(f"{src} has no split {split!r}; splits are {sorted(splits)}")
    return splits[split]


def _split_of(file: Path) -> str:
    """Hub layouts: data/train-00000-of-00002.parquet, train.parquet, or train/0000.parquet."""
    if "-" in file.stem:
        return file.stem.split("-")[0]
    return file.parent.name if file.stem.isdigit() else file.stem


def _split_files(files: list[Path], split: str | None, src: Path) -> list[Path]:
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    return _pick(by_split, split, src)


def _jsonl_rows(path: Path) -> Iterator[_RawRow]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield _RawRow(path, lineno, True, None, f"invalid JSON: {err}")
                continue
            if not isinstance(record, dict):
                yield _RawRow(path, lineno, True, None, f"a row must be a JSON object, got {type(record).__name__}")
                continue
            yield _RawRow(path, lineno, True, record)


def _parquet_schema(files: list[Path]) -> set[str]:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    for f in files[1:]:
        other = set(pq.read_schema(f).names)
        if other != names:
            raise DataError(f"{f}: columns {sorted(other)} differ from {files[0]}'s {sorted(names)}")
    return names


def _parquet_rows(files: list[Path]) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    for f in files:
        index = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield _RawRow(f, index, False, record)
                index += 1


def _arrow_dataset(files: list[Path]) -> Any:
    import datasets

    parts = [datasets.Dataset.from_file(str(f)) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _dataset_rows(ds: Any, src: Path) -> tuple[Iterator[_RawRow], set[str]]:
    """Rows as raw Arrow values, so `Image` features arrive as {'bytes', 'path'} dicts and are not decoded here."""

    def rows() -> Iterator[_RawRow]:
        index = 0
        for table in ds.with_format("arrow").iter(batch_size=256):
            for record in table.to_pylist():
                yield _RawRow(src, index, False, record)
                index += 1

    return rows(), set(ds.column_names)
