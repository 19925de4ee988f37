"""Run the real trainer in this process with its rollout engine's and learner's methods wrapped to record the order
in which the trainer calls them (no behaviour changed); write the record as JSON.

    python tests/reliability/trainer_calls.py OUT.json RECIPE [a.b=c ...]
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

ENGINE_METHODS = ("generate", "sleep", "wake", "update_weights")
LEARNER_METHODS = ("compute_logprobs", "compute_ref_logprobs", "update")


def _record(obj: Any, name: str, tag: str, calls: list[str]) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(tag)
        return fn(*args, **kwargs)

    setattr(obj, name, wrapper)


def main(out: str, recipe_path: str, *overrides: str) -> None:
    from vlm_sapo.recipe import load_recipe
    from vlm_sapo.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_path, list(overrides)))
    calls: list[str] = []
    _record(trainer, "train_step", "step", calls)
    for name in ENGINE_METHODS:
        _record(trainer.engine, name, f"engine.{name}", calls)
    for name in LEARNER_METHODS:
        _record(trainer.learner, name, f"learner.{name}", calls)
    engine = trainer.engine
    info = {"engine": type(engine).__name__, "owns_model": getattr(engine, "owns_model", None),
            "sleep_mode": getattr(engine, "sleep_mode", None),
            "shares_weights": trainer.engine.shares_weights, "reference_bytes":
                trainer.learner.reference.nbytes if trainer.learner.reference is not None else 0}
    run_dir = trainer.fit()
    with open(out, "w") as f:
        json.dump({**info, "calls": calls, "run_dir": str(run_dir)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
