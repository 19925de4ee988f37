"""A checkpoint resumes only under the recipe it was written with (up to the changes listed in `RESUMABLE_CHANGES`).

A checkpoint's trainer state holds the whole resolved recipe. Resuming compares it with the current one key by key
(dotted paths, list items by index); any other difference is refused, naming the keys and the two ways out: a new
`name` (a new run folder, so nothing is resumed) or `--resume force`. Without this a changed reward function resumed
the old run's checkpoint, "finished" at once and never called the new reward.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys that may change between a checkpoint and its resume, each with why that is safe (fnmatch patterns).
RESUMABLE_CHANGES: dict[str, str] = {
    "learner.steps": "extending or shortening a run is what resuming is for (a cosine/linear schedule is recomputed "
                     "for the new total)",
    "eval.*": "validation reads the policy and never changes it",
    "logging.*": "where and how metrics are written, not what a step computes",
    "checkpoint.every_steps": "how often state is saved, not the state",
    "checkpoint.keep_last": "how many old checkpoints are kept",
    "checkpoint.resume": "how this process was started (`--resume` sets it)",
    "checkpoint.export_hf": "only the export at the end",
    "rewards.workers": "how many processes score, not the scores",
    "rollout.on_engine_death": "what happens after a crash, not what a step computes",
    "learner.max_nonfinite_in_a_row": "when repeated non-finite updates stop the run; an applied update is unchanged",
}
FORCE = "force"
_ABSENT = "<absent>"


class ResumeRefused(RuntimeError):
    """The checkpoint was written under a recipe that differs in keys that change what training computes."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a recipe dump: `a.b`, list items of sections as `a[0].b`; other lists stay whole values."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key whose value differs, sorted by key."""
    a, b = flatten(saved), flatten(current)
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_CHANGES)


def saved_recipe(checkpoint: Path) -> dict[str, Any] | None:
    """The recipe a checkpoint was written under (None for checkpoints that predate recording it)."""
    from vlm_sapo.checkpoint import TRAINER_STATE

    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    recipe = state.get("recipe")
    return recipe if isinstance(recipe, dict) else None


def check_resume(checkpoint: Path, current: dict[str, Any], *, force: bool = False) -> list[str]:
    """Refuse (`ResumeRefused`) to resume `checkpoint` under the recipe dump `current` when they differ outside
    `RESUMABLE_CHANGES`; with `force`, log the differences and go on. Returns the refused keys."""
    saved = saved_recipe(checkpoint)
    if saved is None:
        changed = ["<the checkpoint records no recipe>"]
        detail = "it was written by an older vlm_sapo that did not record its recipe"
    else:
        diffs = [d for d in recipe_differences(saved, current) if not resumable(d[0])]
        changed = [k for k, _, _ in diffs]
        detail = "differing keys: " + "; ".join(f"`{k}` {old!r} -> {new!r}" for k, old, new in diffs)
    if not changed:
        return []
    if force:
        log.warning("--resume force: resuming %s under a different recipe (%s)", checkpoint, detail)
        return changed
    run_dir = current.get("logging", {}).get("dir", "runs/{name}")
    new_run = ("give the run a new `name` (its folder is logging.dir = " + repr(run_dir) + ")" if "{name}" in run_dir
               else "give the run a new `logging.dir` (" + repr(run_dir) + " does not depend on `name`)")
    raise ResumeRefused(
        f"refusing to resume {checkpoint}: it was written under a different recipe; {detail}. Changes allowed on "
        f"resume: {', '.join(RESUMABLE_CHANGES)}. Either start a new run ({new_run}) or resume anyway with "
        f"`--resume {FORCE}` (checkpoint.resume={FORCE})")
