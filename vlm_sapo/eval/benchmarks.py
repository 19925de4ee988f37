"""Benchmarks: named adapters from each benchmark's published column layout to the `Sample`s of a task.

A benchmark names its task (so it is prompted, parsed and scored exactly as that task is in training), one or more
column layouts (the Hugging Face hub layout first, then local ones such as the project's shared subsets), the
categories it reports, and the paper whose metric it follows. The registry is open: ``register_benchmark``.

Naming a benchmark on the command line (``--benchmarks a,b``):

- ``NAME``: the hub dataset, unless ``--data-root DIR`` holds a folder called NAME (or the hub id's last part);
- ``NAME=SOURCE``: a file, a folder (a saved dataset, Parquet/Arrow files as the hub stores them, or JSON lines) or a
  hub id; a relative SOURCE is looked up under ``--data-root`` first;
- ``NAME:SPLIT`` (with or without ``=SOURCE``) picks a split, e.g. ``refcoco:testA``;
- ``jsonl:PATH`` or ``jsonl:TASK:PATH``: any file in the project's row format (``id, image(s), question, answer`` plus
  meta), task ``math`` unless named; a ``category`` column gives categories.

The layout of a local source is recognised by its columns; a hub id is read in the hub layout. MathVerse and other
datasets with several configs must be given as a local folder (the loader takes no config name).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_sapo.data import BadRow, DataError, Sample, load_samples
from vlm_sapo.suggest import did_you_mean
from vlm_sapo.tasks import get_task, list_tasks


@dataclass(frozen=True)
class Layout:
    """One column layout: recognised by `required` columns, mapped by `columns` (project field -> source column, as
    `load_samples` takes it), then `adapt`ed (rename meta keys, convert answers, one row into several samples)."""

    name: str
    required: frozenset[str]
    columns: Mapping[str, str] = field(default_factory=dict)
    adapt: Callable[[Sample], list[Sample]] | None = None


def _no_categories(sample: Sample) -> list[str]:
    return []


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task: str
    layouts: tuple[Layout, ...]  # the first is the hub layout
    hub_id: str | None = None
    split: str | None = None
    local_files: tuple[str, ...] = ()  # preferred JSON-lines file names inside a local folder
    categories: Callable[[Sample], list[str]] = _no_categories
    metric_label: str = "accuracy"  # how the task's metric is called in this benchmark's paper
    reference: str = ""  # the paper, and how it scores


@dataclass
class LoadedBenchmark:
    """A benchmark's samples, ready to render, with each sample's categories."""

    name: str
    spec: BenchmarkSpec
    source: str
    layout: str
    samples: list[Sample]
    categories: dict[str, list[str]]
    skipped: list[BadRow] = field(default_factory=list)


_BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec, *, replace: bool = False) -> BenchmarkSpec:
    if spec.name in _BENCHMARKS and not replace:
        raise ValueError(f"benchmark {spec.name!r} is already registered (pass replace=True to override it)")
    if not spec.layouts:
        raise ValueError(f"benchmark {spec.name!r} has no column layout")
    _BENCHMARKS[spec.name] = spec
    return spec


def get_benchmark(name: str) -> BenchmarkSpec:
    try:
        return _BENCHMARKS[name]
    except KeyError:
        hint = did_you_mean(name, _BENCHMARKS)
        raise KeyError(f"unknown benchmark {name!r} (registered: {', '.join(sorted(_BENCHMARKS))}, or "
                       f"jsonl:PATH){hint}") from None


def list_benchmarks() -> list[str]:
    return sorted(_BENCHMARKS)


# ---------------------------------------------------------------------------------------------- naming and loading
@dataclass(frozen=True)
class BenchmarkRef:
    """A parsed ``--benchmarks`` entry."""

    spec: BenchmarkSpec
    name: str
    source: str | None = None
    split: str | None = None


def parse_benchmark(text: str) -> BenchmarkRef:
    text = text.strip()
    if not text:
        raise ValueError("empty benchmark name")
    if text.startswith("jsonl:"):
        rest = text[len("jsonl:"):]
        task, sep, path = rest.partition(":")
        if not sep or task not in list_tasks():
            task, path = "math", rest
        if not path:
            raise ValueError(f"{text!r}: give a file, as jsonl:PATH or jsonl:TASK:PATH")
        return BenchmarkRef(jsonl_spec(task), Path(path).stem, source=path)
    head, _, source = text.partition("=")
    name, _, split = head.partition(":")
    return BenchmarkRef(get_benchmark(name.strip()), name.strip(), source.strip() or None, split.strip() or None)


def jsonl_spec(task: str) -> BenchmarkSpec:
    """A benchmark over rows already in the project's format, scored by `task`."""
    get_task(task)
    return BenchmarkSpec(name=f"jsonl:{task}", task=task, layouts=(Layout("project rows", frozenset()),),
                         categories=_meta_categories("category", "category"),
                         reference=f"the {task} task's own reward and metric")


def load_benchmark(ref: BenchmarkRef | BenchmarkSpec | str, *, data_root: str | os.PathLike | None = None,
                   limit: int | None = None, on_bad_row: Literal["fail", "skip"] = "fail") -> LoadedBenchmark:
    """Load and validate a benchmark's samples (`limit`: the first rows, before any row is split in several)."""
    if isinstance(ref, str):
        ref = parse_benchmark(ref)
    elif isinstance(ref, BenchmarkSpec):
        ref = BenchmarkRef(ref, ref.name)
    spec = ref.spec
    source, is_hub = _resolve_source(ref, data_root)
    if is_hub:
        layout = spec.layouts[0]
    else:
        columns = _columns_of(Path(source), ref.split or spec.split)
        matching = [lay for lay in spec.layouts if lay.required <= columns]
        if not matching:
            wanted = "; ".join(f"{lay.name}: {sorted(lay.required)}" for lay in spec.layouts)
            raise DataError(f"benchmark {ref.name!r}: {source} has columns {sorted(columns)}, which match none of "
                            f"its layouts ({wanted})")
        layout = matching[0]
    split = _split_for(source, is_hub, ref)
    result = load_samples(source, task=spec.task, columns=dict(layout.columns) or None, split=split, limit=limit,
                          on_bad_row=on_bad_row)
    samples: list[Sample] = []
    for sample in result.samples:
        try:
            samples.extend(layout.adapt(sample) if layout.adapt else [sample])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"benchmark {ref.name!r} ({source}, layout {layout.name}): sample {sample.id!r}: "
                            f"{type(err).__name__}: {err}") from err
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"benchmark {ref.name!r}: duplicate sample ids after adapting rows: {dup}")
    categories = {s.id: spec.categories(s) for s in samples}
    return LoadedBenchmark(ref.name, spec, str(source), layout.name, samples, categories, result.skipped)


def _resolve_source(ref: BenchmarkRef, data_root: str | os.PathLike | None) -> tuple[str, bool]:
    """(source, is_hub_id); a local folder without Parquet/Arrow/saved-dataset files resolves to its JSON-lines file."""
    root = Path(data_root).expanduser() if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    if ref.source is not None:
        given = Path(ref.source).expanduser()
        for candidate in ([root / given] if root is not None and not given.is_absolute() else []) + [given]:
            if candidate.exists():
                return str(_pick_file(candidate, ref.spec)), False
        if _looks_like_hub_id(ref.source):
            return ref.source, True
        raise DataError(f"benchmark {ref.name!r}: {ref.source} is neither a file or folder"
                        f"{f' (also looked under {root})' if root else ''} nor a hub id")
    names = [ref.name] + ([ref.spec.hub_id.split("/")[-1]] if ref.spec.hub_id else [])
    if root is not None:
        for name in names:
            if (root / name).exists():
                return str(_pick_file(root / name, ref.spec)), False
    if ref.spec.hub_id:
        return ref.spec.hub_id, True
    raise DataError(f"benchmark {ref.name!r} has no hub id: give its data as {ref.name}=PATH"
                    f"{f' (no folder {ref.name!r} under {root})' if root else ''}")


def _split_for(source: str, is_hub: bool, ref: BenchmarkRef) -> str | None:
    """The split to read: a hub dataset or a folder of splits takes one; a single file or saved Dataset has none."""
    path = Path(source)
    if not is_hub and path.is_file() or (path / "state.json").exists() and not (path / "dataset_dict.json").exists():
        if ref.split is not None:
            raise ValueError(f"benchmark {ref.name!r}: split {ref.split!r} given, but {source} holds one split only")
        return None
    return ref.split or ref.spec.split


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


def _pick_file(path: Path, spec: BenchmarkSpec) -> Path:
    if not path.is_dir():
        return path
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return path
    if any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")):
        return path
    for name in spec.local_files:
        if (path / name).is_file():
            return path / name
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".ndjson"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise DataError(f"{path}: no saved dataset, Parquet, Arrow or JSON-lines file in this folder")
    raise DataError(f"{path}: several JSON-lines files ({', '.join(f.name for f in files)}); name one with "
                    f"{spec.name}=FILE")


def _columns_of(path: Path, split: str | None) -> set[str]:
    """The source's column names (JSON lines: the first row's keys), to recognise its layout."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}: first row is not valid JSON: {err}") from err
                        return set(row) if isinstance(row, dict) else set()
            raise DataError(f"{path} is empty")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
        if suffix == ".arrow":
            import datasets

            return set(datasets.Dataset.from_file(str(path)).column_names)
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .ndjson, .parquet, .arrow or a folder")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split] if split in ds else next(iter(ds.values()))
        return set(ds.column_names)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        return set(pq.read_schema(parquet[0]).names)
    arrow = sorted(path.rglob("*.arrow"))
    if arrow:
        import datasets

        return set(datasets.Dataset.from_file(str(arrow[0])).column_names)
    raise DataError(f"{path}: folder holds no saved dataset, .parquet or .arrow files")


# ------------------------------------------------------------------------------------------------------ helpers
def _meta_categories(key: str, label: str) -> Callable[[Sample], list[str]]:
    """Categories from one meta key (a string, a number or a list of them), as "label=value"."""

    def categories(sample: Sample) -> list[str]:
        value = sample.meta.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        return [f"{label}={v}" for v in values if v is not None and str(v).strip()]

    return categories


def _nested_categories(*pairs: tuple[str, str]) -> Callable[[Sample], list[str]]:
    """Categories from dotted meta keys ("metadata.task"), each as "label=value"; lists give one category each."""

    def categories(sample: Sample) -> list[str]:
        out = []
        for dotted, label in pairs:
            value: Any = sample.meta
            for part in dotted.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            values = value if isinstance(value, (list, tuple)) else [value]
            out += [f"{label}={v}" for v in values if v is not None and str(v).strip()]
        return out

    return categories


def _strip_image_tags(sample: Sample) -> list[Sample]:
    """EasyR1-style rows put "<image>" into the problem text; the chat template places the image instead."""
    return [dataclasses.replace(sample, question=sample.question.replace("<image>", "").strip())]


def _rename_meta(**renames: str) -> Callable[[Sample], list[Sample]]:
    def adapt(sample: Sample) -> list[Sample]:
        meta = dict(sample.meta)
        for old, new in renames.items():
            if old in meta:
                meta[new] = meta.pop(old)
        return [dataclasses.replace(sample, meta=meta)]

    return adapt


def _geometry3k_hub(sample: Sample) -> list[Sample]:
    return _strip_image_tags(_rename_meta(answer="answer_value")(sample)[0])


def _mathvision_hub(sample: Sample) -> list[Sample]:
    """`options` is a list here (a choice list, empty for free-form), not We-Math's option string."""
    meta = dict(sample.meta)
    options = meta.pop("options", None)
    meta["choices"] = list(options) if options else None
    return [dataclasses.replace(sample, meta=meta)]


def _chartqa_hub(sample: Sample) -> list[Sample]:
    meta = dict(sample.meta)
    source = meta.get("human_or_machine")
    meta["human_or_machine"] = {0: "human", 1: "machine"}.get(source, source)  # the ClassLabel's names
    return [dataclasses.replace(sample, meta=meta)]


def _xywh_to_xyxy(box: Any) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def _refcoco_hub(sample: Sample) -> list[Sample]:
    """lmms-lab's RefCOCO rows hold one box ([x, y, w, h], COCO style) and a list of referring expressions; as in
    lmms-eval, each expression becomes its own sample (id "<question_id>#<k>")."""
    meta = dict(sample.meta)
    expressions = meta.pop("answer")
    meta.pop("segmentation", None)  # polygons: large, and not used by box grounding
    if isinstance(expressions, str):
        expressions = [expressions]
    box = _xywh_to_xyxy(sample.answer)
    return [dataclasses.replace(sample, id=f"{sample.id}#{k}", question=str(e).strip(), answer=box, meta=dict(meta))
            for k, e in enumerate(expressions) if str(e).strip()]


# ---------------------------------------------------------------------------------------------------- built-ins
_ID_IMAGE_QA = frozenset({"id", "image", "question", "answer"})

GEOMETRY3K = BenchmarkSpec(
    name="geometry3k", task="math", hub_id="hiyouga/geometry3k", split="test",
    layouts=(
        Layout("hub hiyouga/geometry3k", frozenset({"images", "problem", "ground_truth", "choices"}),
               {"question": "problem", "answer": "ground_truth"}, _geometry3k_hub),
        Layout("InterGPS rows (shared subset)", _ID_IMAGE_QA | {"choices"}),
        Layout("hub hiyouga/geometry3k, values only", frozenset({"images", "problem", "answer"}),
               {"question": "problem"}, _strip_image_tags),
    ),
    categories=_meta_categories("problem_type_goal", "goal"),
    metric_label="choice accuracy",
    reference="Inter-GPS (Lu et al., ACL 2021): accuracy of the chosen option; the letter, or the value of a choice, "
              "counts (math task, math-verify for values)",
)

WEMATH = BenchmarkSpec(
    name="wemath", task="math", hub_id="We-Math/We-Math", split="testmini",
    layouts=(
        Layout("hub We-Math/We-Math", frozenset({"ID", "question", "option", "answer", "image_path"}),
               {"images": "image_path"},
               _rename_meta(option="options", **{"knowledge concept": "knowledge_concept"})),
        Layout("We-Math rows (shared subset)", _ID_IMAGE_QA | {"options"}),
    ),
    categories=_meta_categories("knowledge_concept", "concept"),
    metric_label="accuracy",
    reference="We-Math (Qiao et al., 2024): per-question accuracy of the option letter (the paper's four-way "
              "IK/IG/CM/RM analysis over multi-step problems is not computed); We-Math IDs repeat, so hub rows are "
              "numbered '<file>:<row>'",
)

MATHVISTA = BenchmarkSpec(
    name="mathvista", task="mathvista", hub_id="AI4Math/MathVista", split="testmini",
    layouts=(
        Layout("hub AI4Math/MathVista", frozenset({"pid", "question", "decoded_image", "answer", "question_type",
                                                   "answer_type"}),
               {"id": "pid", "images": "decoded_image"}),
        Layout("MathVista rows with image paths", frozenset({"pid", "question", "image", "answer", "question_type",
                                                             "answer_type"}),
               {"id": "pid", "images": "image"}),
    ),
    categories=_nested_categories(("metadata.task", "task"), ("metadata.skills", "skill")),
    metric_label="accuracy",
    reference="MathVista (Lu et al., ICLR 2024): multiple choice by the choice letter or the nearest choice text; "
              "free form by answer type (integer, float rounded to `precision`, list/text exact), as its "
              "calculate_score.py; answers extracted by rule, not by an LLM",
)

MATHVERSE = BenchmarkSpec(
    name="mathverse", task="math", hub_id="AI4Math/MathVerse", split="testmini",
    layouts=(
        Layout("hub AI4Math/MathVerse (testmini config)",
               frozenset({"sample_index", "question", "image", "answer", "question_type", "problem_version"}),
               {"id": "sample_index"}),
    ),
    categories=_nested_categories(("problem_version", "version"), ("metadata.subject", "subject")),
    metric_label="accuracy",
    reference="MathVerse (Zhang et al., ECCV 2024): accuracy by rule (option letter; math-verify for free-form "
              "answers) instead of the paper's GPT-4 extraction and judging; per problem version",
)

MATHVISION = BenchmarkSpec(
    name="mathvision", task="math", hub_id="MathLLMs/MathVision", split="test",
    layouts=(
        Layout("hub MathLLMs/MathVision", frozenset({"id", "question", "options", "decoded_image", "answer"}),
               {"images": "decoded_image"}, _mathvision_hub),
        Layout("MATH-Vision rows with image paths", _ID_IMAGE_QA | {"options"}, {}, _mathvision_hub),
    ),
    categories=_nested_categories(("subject", "subject"), ("level", "level")),
    metric_label="accuracy",
    reference="MATH-Vision (Wang et al., NeurIPS 2024 D&B): option letter for multiple choice, equivalence of the "
              "final answer otherwise (math-verify here)",
)

CHARTQA = BenchmarkSpec(
    name="chartqa", task="chart", hub_id="HuggingFaceM4/ChartQA", split="test",
    layouts=(
        Layout("hub HuggingFaceM4/ChartQA", frozenset({"image", "query", "label"}),
               {"question": "query", "answer": "label"}, _chartqa_hub),
        Layout("MultiChartQA single-chart rows (shared subset)", _ID_IMAGE_QA | {"answer_is_numeric"}),
        Layout("chart rows", frozenset({"image", "question", "answer"})),
    ),
    categories=lambda s: (_meta_categories("human_or_machine", "source")(s) or _meta_categories("task", "type")(s)),
    metric_label="relaxed accuracy",
    reference="ChartQA (Masry et al., ACL Findings 2022): relaxed accuracy, numbers within 5% of the label, text "
              "exact (case-insensitive); per human/machine-written split",
)


def _refcoco_spec(name: str, hub_id: str, split: str, paper: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name, task="grounding", hub_id=hub_id, split=split, local_files=("grounding.jsonl",),
        layouts=(
            Layout(f"hub {hub_id}", frozenset({"question_id", "image", "question", "answer", "bbox"}),
                   {"id": "question_id", "answer": "bbox"}, _refcoco_hub),
            Layout("COCO phrase grounding rows (shared coco128 subset)", frozenset({"id", "image", "phrase", "bbox"}),
                   {"question": "phrase", "answer": "bbox"}),
        ),
        categories=_meta_categories("category", "category"),
        metric_label="Acc@0.5",
        reference=f"{paper}: a box is right when IoU >= 0.5 with the labelled box (in original image pixels); "
                  "lmms-lab rows are one sample per referring expression, as in lmms-eval",
    )


REFCOCO = _refcoco_spec("refcoco", "lmms-lab/RefCOCO", "val", "RefCOCO (Kazemzadeh et al., EMNLP 2014; Yu et al., "
                        "ECCV 2016)")
REFCOCO_PLUS = _refcoco_spec("refcoco+", "lmms-lab/RefCOCOplus", "val", "RefCOCO+ (Yu et al., ECCV 2016)")
REFCOCOG = _refcoco_spec("refcocog", "lmms-lab/RefCOCOg", "val", "RefCOCOg (Mao et al., CVPR 2016)")

for _spec in (GEOMETRY3K, WEMATH, MATHVISTA, MATHVERSE, MATHVISION, CHARTQA, REFCOCO, REFCOCO_PLUS, REFCOCOG):
    register_benchmark(_spec, replace=True)
