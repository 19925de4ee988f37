"""The DeepSpeed config the learner generates, and the user's file merged over it.

Two choices are fixed here because the learner depends on them:
- no `optimizer`/`scheduler` block: a torch AdamW and a LambdaLR are passed in (a DeepSpeed `optimizer` block JIT-builds
  fused_adam, about 100 s, and its schedulers differ from ours);
- `managed_gradient_accumulation: false`: a mini-batch is split into a varying number of token-budget micro-batches, so
  `step()` (not a fixed count of `backward()` calls) marks the accumulation boundary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Keys the learner owns; a user file that sets them would silently break the update (see module docstring).
_FORBIDDEN = ("optimizer", "scheduler", "gradient_accumulation_steps", "managed_gradient_accumulation",
              "train_batch_size", "train_micro_batch_size_per_gpu")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON (or YAML, read with safe_load) file; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise FileNotFoundError(f"DeepSpeed config {p}: {e}") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"DeepSpeed config {p}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed config {p}: expected a mapping at the top level, got {type(data).__name__}")
    if isinstance(data.get("fp16"), dict) and data["fp16"].get("enabled"):
        raise ValueError(f"DeepSpeed config {p}: fp16 is not supported by the learner; use bf16 (or fp32)")
    bad = [k for k in _FORBIDDEN if k in data]
    if bad:
        raise ValueError(f"DeepSpeed config {p}: keys {bad} are set by the learner (optimizer and schedule come "
                         f"from the recipe's learner section; micro-batches from micro_batch_tokens); remove them")
    return data


def build_ds_config(*, zero_stage: int, bf16: bool, grad_clip: float | None,
                    user_config: str | Path | None = None) -> dict[str, Any]:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: micro-batches are packed by tokens
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip) if grad_clip else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},  # a non-finite grad skips the step, also in bf16
        "zero_allow_untested_optimizer": True,  # torch AdamW
        "steps_per_print": 2**62,  # the trainer logs; DeepSpeed's own progress lines are noise
        "wall_clock_breakdown": False,
    }
    if user_config is not None:
        config = deep_merge(config, load_user_config(user_config))
    return config
