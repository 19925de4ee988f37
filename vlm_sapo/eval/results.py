"""What an evaluation produces: one `Prediction` per completion, one `BenchmarkResult` per benchmark, `EvalResults`.

`EvalResults.to_dict()` is the `results.json` format (schema "vlm_sapo.eval/1"), which `vlm-sapo compare` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm_sapo.eval.stats import Estimate

SCHEMA = "vlm_sapo.eval/1"


@dataclass
class Prediction:
    """One scored completion; `score` is the benchmark metric, `scores` every score of its reward."""

    benchmark: str
    id: str
    sample_index: int
    completion: str
    parsed_answer: Any
    score: float
    scores: dict[str, float]
    answer: Any
    categories: list[str]
    prompt: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    scoring_meta: dict[str, Any] = field(default_factory=dict)  # coord_system, sizes: enough to re-score a box

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "benchmark": self.benchmark, "sample_index": self.sample_index, "prompt": self.prompt,
            "completion": self.completion, "parsed_answer": _plain(self.parsed_answer), "score": self.score,
            "answer": _plain(self.answer), "scores": self.scores, "categories": self.categories,
            "finish_reason": self.finish_reason, "error": self.error, **_plain(self.scoring_meta),
        }


@dataclass
class BenchmarkResult:
    name: str
    task: str
    metric: str  # the task's metric key in its reward's scores
    metric_label: str  # what the benchmark's paper calls it
    reference: str
    source: str
    layout: str
    questions: int
    completions_per_question: int
    overall: dict[str, Estimate]
    categories: dict[str, tuple[int, dict[str, Estimate]]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> prompts not evaluated
    reward_errors: int = 0  # completions whose reward failed or timed out (scored 0)
    missing_ids: list[str] = field(default_factory=list)  # benchmark samples without predictions (score)
    unknown_ids: list[str] = field(default_factory=list)  # prediction ids the benchmark does not have (score)
    skipped_rows: list[str] = field(default_factory=list)  # bad source rows skipped at load time
    answers: dict[str, Any] = field(default_factory=dict)  # AnswerSpread.as_dict(): distinct answers, top share

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "metric": self.metric, "metric_label": self.metric_label, "reference": self.reference,
            "source": self.source, "layout": self.layout, "questions": self.questions,
            "completions_per_question": self.completions_per_question,
            "overall": {k: e.as_dict() for k, e in self.overall.items()},
            "categories": {c: {"questions": n, **{k: e.as_dict() for k, e in stats.items()}}
                           for c, (n, stats) in self.categories.items()},
            "dropped": self.dropped, "reward_errors": self.reward_errors, "missing_ids": self.missing_ids,
            "unknown_ids": self.unknown_ids, "skipped_rows": self.skipped_rows, "answers": self.answers,
        }


@dataclass
class EvalResults:
    benchmarks: dict[str, BenchmarkResult]
    predictions: list[Prediction]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "settings": _plain(self.settings),
                "benchmarks": {name: b.as_dict() for name, b in self.benchmarks.items()}}

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat numbers for a metrics log: `eval/<benchmark>/<stat>` (e.g. `eval/geometry3k/pass@1`), and the spread
        of the answers (`eval/<benchmark>/answers/distinct|top_share`)."""
        out = {f"{prefix}{name}/{stat}": e.value for name, b in self.benchmarks.items() for stat, e in b.overall.items()}
        for name, b in self.benchmarks.items():
            if b.answers:
                out[f"{prefix}{name}/answers/distinct"] = float(b.answers["distinct"])
                out[f"{prefix}{name}/answers/top_share"] = float(b.answers["top_share"])
        return out


def _plain(value: Any) -> Any:
    """JSON-ready: tuples to lists, dict keys to strings, anything unknown to its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
