"""vlm_sapo's side of `vs_trl.py`: the project's own `Trainer`, one `train_step()` per "go" from the driver.

    .venv/bin/python benchmarks/side_ours.py '<Work as JSON>'

The recipe is built from `Work` with everything that is not part of the step's work switched off (checkpoints,
evaluation, HF export, TensorBoard): fp32, ZeRO-2 on one CPU process, AdamW (weight decay 0, grad clip 1.0), constant lr,
SAPO (tau_pos 1.0, tau_neg 1.05), GRPO advantages, no KL (so no reference model), every group kept.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/rewards.py would shadow the project's `rewards` package (reward workers get this sys.path too): take this
# folder off the path and import the sibling modules as `benchmarks.*` from the repository root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_common import Work, fixtures, report, wait_for_go  # noqa: E402


def recipe_dict(work: Work, model: str, rows: str, run_dir: str) -> dict:
    return {
        "name": "bench_ours",
        "seed": work.seed,
        "model": {"path": model, "dtype": "float32", "min_pixels": work.min_pixels, "max_pixels": work.max_pixels},
        "data": {"train": [{"path": rows, "task": work.task}], "prompts_per_step": work.prompts,
                 "max_prompt_tokens": work.max_prompt_tokens},
        "rollout": {"backend": work.backend, "n": work.g, "max_new_tokens": work.max_new_tokens,
                    "temperature": work.temperature, "top_p": 1.0, "top_k": -1,
                    "vllm": {"enforce_eager": True, "max_model_len": work.max_prompt_tokens + work.max_new_tokens}},
        "algorithm": {"loss": {"name": "sapo", "tau_pos": 1.0, "tau_neg": 1.05}, "advantage": {"name": "grpo"},
                      "mini_batches": work.mini_batches, "zero_variance_groups": "keep", "kl_coef": 0.0},
        "learner": {"steps": 10_000, "lr": work.lr, "lr_schedule": "constant", "weight_decay": 0.0, "grad_clip": 1.0,
                    "zero_stage": 2},
        "rewards": {"workers": 1},
        "eval": {"at_end": False},
        "logging": {"dir": run_dir, "tensorboard": False, "progress": False},
        "checkpoint": {"every_steps": 0, "export_hf": False, "resume": "never"},
    }


def main() -> None:
    from vlm_sapo.recipe import validate_recipe
    from vlm_sapo.trainer import Trainer

    work = Work.from_json(sys.argv[1])
    model, rows = fixtures()
    trainer = Trainer(validate_recipe(recipe_dict(work, str(model), str(rows), tempfile.mkdtemp(prefix="bench_ours_"))))
    report(ready=True)
    while wait_for_go():
        t0 = time.perf_counter()
        metrics, _ = trainer.train_step()
        step_s = time.perf_counter() - t0
        rollout_s = metrics.get("time/rollout_and_reward", 0.0)
        completion_tokens = metrics["response/length_mean"] * work.prompts * work.g
        report(step_s=step_s, rollout_s=rollout_s, completion_tokens=completion_tokens,
               learner_tokens=completion_tokens, learner_s=step_s - rollout_s,
               prompt_tokens=metrics.get("rollout/prompt_tokens", float("nan")))
    trainer.close()


if __name__ == "__main__":
    main()
