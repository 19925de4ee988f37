"""Per-step digests of the full policy weights, one file per rank: do data-parallel ranks hold the same weights?

With `VLM_SAPO_WEIGHT_DIGEST=1` the trainer appends `{"step", "rank", "sha256"}` to
`<run>/weight_digests/rank_<rank>.jsonl` after every step; equal lines across ranks mean bitwise-equal weights (a rank
that drifted, e.g. from a gradient reduced in a different order, would otherwise go unnoticed until the end). The
weights are those the rollout engine gets (LoRA merged); under ZeRO-3 that gathers every parameter, a collective all
ranks make. A restarted run appends again from the step it resumed at: the last line of a step is the one that counts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

DIGEST_ENV = "VLM_SAPO_WEIGHT_DIGEST"


def weights_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over every (name, dtype, shape, bytes) in order."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record_weight_digest(learner: Any, run_dir: Path, step: int, rank: int) -> str:
    digest = weights_sha256(learner.named_weights_for_rollout())  # every rank drains it (ZeRO-3 gathers)
    folder = Path(run_dir) / "weight_digests"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank_{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "rank": rank, "sha256": digest}) + "\n")
    return digest


def last_digests(run_dir: Path) -> dict[int, dict[int, str]]:
    """{rank: {step: sha256}} from the files, the last line of each step winning (a resumed run repeats steps)."""
    out: dict[int, dict[int, str]] = {}
    for path in sorted((Path(run_dir) / "weight_digests").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out.setdefault(int(row["rank"]), {})[int(row["step"])] = row["sha256"]
    return out
