"""Renders benchmarks/sapo_regime.py's results JSON: a markdown table and the curves PNG (filled in below)."""

from __future__ import annotations

import json
from pathlib import Path


def render(results: Path, out_dir: Path) -> None:
    data = json.loads(Path(results).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sapo_regime.md").write_text(f"{len(data['summary'])} arms\n")
