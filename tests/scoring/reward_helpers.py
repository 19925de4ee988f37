"""Helpers for the reward tests (a plain module, not a conftest, so its name cannot clash with other folders')."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(shared_data: Path, relative: str) -> list[dict]:
    path = shared_data / relative
    assert path.is_file(), f"{path} is missing from the shared data folder"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_model(answer: str, thinking: str = "Reading the figure carefully.") -> str:
    """A completion written the way the built-in prompts ask for it."""
    return f"<think>{thinking}</think>\n<answer>{answer}</answer>"


def ref_iou(a: list[float], b: list[float]) -> float:
    """IoU written independently of rewards.grounding (areas from the union of the two spans)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return ix * iy / (area_a + area_b - ix * iy)
