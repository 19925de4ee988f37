"""Helpers of the evaluation tests (a plain module, not a conftest, so its name cannot clash with other folders')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIXTURE_IMAGES = sorted((REPO / "tests" / "fixtures" / "geometry3k" / "images").glob("*.png"))


def png_bytes(k: int) -> bytes:
    """A real image (Geometry3K fixture, MIT) as the `datasets` Image feature stores it."""
    return FIXTURE_IMAGES[k % len(FIXTURE_IMAGES)].read_bytes()


def write_hub_parquet(folder: Path, split: str, rows: list[dict[str, Any]], features: Any) -> Path:
    """Rows written as the hub stores a dataset: data/<split>-00000-of-00001.parquet, via the real `datasets`."""
    import datasets

    path = folder / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return folder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def as_model(answer: Any) -> str:
    """A completion in the format every built-in instruction asks for."""
    return f"<think>Reading the figure.</think>\n<answer>{answer}</answer>"


def iou(a: list[float], b: list[float]) -> float:
    """Box IoU written independently of rewards.grounding."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0
