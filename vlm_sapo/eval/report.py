"""Result files and tables: results.json, results.md, predictions.jsonl, results.png, and `compare`.

Tables are built from the results.json dict, so `vlm-sapo compare` works on files from any run. Numbers are percent
with their 95% interval; the interval method (Wilson or bootstrap) is named under each table.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from vlm_sapo.eval.results import SCHEMA, EvalResults
from vlm_sapo.tasks.answers import AnswerSpread

CONSOLE_MAX_CATEGORIES = 12


def write_results(results: EvalResults, out_dir: str | os.PathLike) -> Path:
    """Write results.json, results.md, predictions.jsonl and results.png into `out_dir` (created); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = results.to_dict()
    _atomic_write(out / "results.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
    _atomic_write(out / "results.md", markdown_report(data))
    _atomic_write(out / "predictions.jsonl",
                  "".join(json.dumps(p.as_dict(), ensure_ascii=False) + "\n" for p in results.predictions))
    plot_results(data, out / "results.png")
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json (or the run folder holding one), checked to be an evaluation's results."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"no results file at {p} (give a results.json or the folder `vlm-sapo eval` wrote)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{p}: not a vlm-sapo results file (expected schema {SCHEMA!r} with 'benchmarks')")
    return data


# ------------------------------------------------------------------------------------------------------- tables
def _stat_order(name: str) -> tuple[int, int]:
    kind, _, k = name.partition("@")
    return (0 if kind == "pass" else 1, int(k) if k.isdigit() else 0)


def _columns(data: dict[str, Any]) -> list[str]:
    names = {s for b in data["benchmarks"].values() for s in b["overall"]}
    return sorted(names, key=_stat_order)


def _pct(stat: dict[str, Any] | None, with_ci: bool = True) -> str:
    if not stat or stat.get("value") is None:
        return "—"
    text = f"{100 * stat['value']:.1f}"
    if with_ci and stat.get("ci_low") is not None:
        text += f" ({100 * stat['ci_low']:.1f}–{100 * stat['ci_high']:.1f})"
    return text


def markdown_table(data: dict[str, Any], *, max_categories: int | None = None) -> str:
    """One row per benchmark, then one per category (those with more than `max_categories` are left out)."""
    cols = _columns(data)
    lines = ["| benchmark | metric | N | " + " | ".join(f"{c} (95% CI)" for c in cols) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    for name, b in data["benchmarks"].items():
        lines.append(f"| **{name}** | {b['metric_label']} | {b['questions']} | "
                     + " | ".join(_pct(b["overall"].get(c)) for c in cols) + " |")
        cats = b.get("categories", {})
        if max_categories is None or len(cats) <= max_categories:
            for cat, stats in cats.items():
                lines.append(f"| {name} · {_cell(cat)} | | {stats['questions']} | "
                             + " | ".join(_pct(stats.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _notes(data: dict[str, Any], *, max_categories: int | None = None) -> list[str]:
    notes = []
    for name, b in data["benchmarks"].items():
        parts = [f"source `{b['source']}` ({b['layout']}), {b['completions_per_question']} completion(s) per question"]
        methods = sorted({s["ci_method"] for s in b["overall"].values() if s.get("ci_method")})
        parts.append("95% CI: " + " / ".join(methods))
        cats = b.get("categories", {})
        if max_categories is not None and len(cats) > max_categories:
            parts.append(f"{len(cats)} categories in results.md")
        for reason, count in b.get("dropped", {}).items():
            if count:
                parts.append(f"**{count} {reason.replace('_', ' ')}**")
        if b.get("reward_errors"):
            parts.append(f"**{b['reward_errors']} reward failures scored 0**")
        if b.get("skipped_rows"):
            parts.append(f"**{len(b['skipped_rows'])} bad source rows skipped**")
        if ans := b.get("answers"):
            text = f"answers: {ans['distinct']} distinct, most common `{ans['top']}` ({100 * ans['top_share']:.0f}%)"
            parts.append(f"**{text}: collapsed onto one answer**" if _collapsed(ans) else text)
        notes.append(f"- {name}: " + "; ".join(parts) + f". Metric: {b['reference']}.")
    return notes


def _collapsed(answers: dict[str, Any]) -> bool:
    return AnswerSpread(**answers).collapsed


def markdown_report(data: dict[str, Any]) -> str:
    settings = data.get("settings", {})
    shown = ", ".join(f"{k}={settings[k]}" for k in ("model", "backend", "predictions", "n", "temperature",
                                                      "max_new_tokens", "limit", "seed") if k in settings)
    out = ["# Evaluation results", "", shown, "", markdown_table(data), *_notes(data)]
    for name, b in data["benchmarks"].items():
        if b.get("unknown_ids") or b.get("missing_ids"):
            out += ["", f"{name}: ids not in the benchmark (first {len(b['unknown_ids'])}): {b['unknown_ids']}",
                    f"{name}: samples without predictions (first {len(b['missing_ids'])}): {b['missing_ids']}"]
    return "\n".join(out) + "\n"


def console_report(data: dict[str, Any]) -> str:
    """The table as printed after a run: categories only for benchmarks with a handful of them."""
    return markdown_table(data, max_categories=CONSOLE_MAX_CATEGORIES) + "\n".join(
        _notes(data, max_categories=CONSOLE_MAX_CATEGORIES)) + "\n"


# -------------------------------------------------------------------------------------------------------- plot
def plot_results(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars: every pass@k / avg@K column per benchmark, with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(data["benchmarks"])
    cols = _columns(data)
    fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 1.0 * len(names) * max(1, len(cols)) ** 0.5), 4.0), dpi=120)
    width = 0.8 / max(1, len(cols))
    x = np.arange(len(names))
    for i, col in enumerate(cols):
        stats = [data["benchmarks"][n]["overall"].get(col) for n in names]
        ok = [s is not None and s.get("value") is not None and s.get("ci_low") is not None for s in stats]
        values = np.array([100 * s["value"] if good else np.nan for s, good in zip(stats, ok)], dtype=float)
        low = np.array([100 * (s["value"] - s["ci_low"]) if good else 0.0 for s, good in zip(stats, ok)])
        high = np.array([100 * (s["ci_high"] - s["value"]) if good else 0.0 for s, good in zip(stats, ok)])
        bars = ax.bar(x + (i - (len(cols) - 1) / 2) * width, np.nan_to_num(values), width, label=col,
                      yerr=np.clip(np.vstack([low, high]), 0.0, None).tolist(), capsize=3)  # clip: round-off at 100
        for bar, v in zip(bars, values):
            if not np.isnan(v):
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, [f"{n}\n(N={data['benchmarks'][n]['questions']})" for n in names], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% (95% CI)")
    title = data.get("settings", {}).get("model") or data.get("settings", {}).get("predictions") or ""
    ax.set_title(Path(str(title)).name or "evaluation", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=max(1, len(cols)), frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------ compare
def compare_results(a: dict[str, Any], b: dict[str, Any], *, label_a: str = "A", label_b: str = "B") -> str:
    """Side-by-side markdown table of two results (benchmarks and categories in either), with B - A in points.

    A delta is starred when the two 95% intervals do not overlap (a rough sign, not a test).
    """
    stats = [s for s in _columns(a) if s in set(_columns(b))] or ["pass@1"]
    rows: list[tuple[str, str]] = []
    for data in (a, b):
        for name, bench in data["benchmarks"].items():
            for key in [""] + list(bench.get("categories", {})):
                if (name, key) not in rows:
                    rows.append((name, key))
    head = "| benchmark | N (A/B) | " + " | ".join(f"{s} {label_a} | {s} {label_b} | Δ {s}" for s in stats) + " |"
    lines = [head, "|---|---:|" + "---:|---:|---:|" * len(stats)]
    for name, key in rows:
        sa, sb = _entry(a, name, key), _entry(b, name, key)
        cells = []
        for s in stats:
            ea, eb = (sa or {}).get(s), (sb or {}).get(s)
            cells += [_pct(ea, with_ci=False), _pct(eb, with_ci=False), _delta(ea, eb)]
        n = f"{(sa or {}).get('questions', '—')}/{(sb or {}).get('questions', '—')}"
        title = f"**{name}**" if not key else f"{name} · {_cell(key)}"
        lines.append(f"| {title} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nΔ = B − A in percentage points; * = the 95% intervals do not overlap.\n"


def _entry(data: dict[str, Any], name: str, key: str) -> dict[str, Any] | None:
    bench = data["benchmarks"].get(name)
    if bench is None:
        return None
    if not key:
        return {"questions": bench["questions"], **bench["overall"]}
    return bench.get("categories", {}).get(key)


def _delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or a.get("value") is None or b.get("value") is None:
        return "—"
    d = 100 * (b["value"] - a["value"])
    bounds = (a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high"))
    separate = None not in bounds and (b["ci_low"] > a["ci_high"] or a["ci_low"] > b["ci_high"])
    return f"{d:+.1f}{'*' if separate else ''}"


def results_label(path: str | os.PathLike) -> str:
    """A short column label for a results path: its run folder's name."""
    p = Path(path)
    name = p.parent.name if p.name == "results.json" else p.name
    return re.sub(r"\s+", "_", name) or str(p)
