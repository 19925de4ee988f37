"""AdamW parameter groups and the learning-rate schedule (warm-up, then constant, cosine or linear decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Factor on the base lr for the update with 0-based index `step`.

    Warm-up is linear from lr/warmup_steps on the first update to lr on update `warmup_steps - 1` (no wasted update
    at lr 0); cosine and linear then decay to 0 at `total_steps`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, biases and norm scales (1-D) do not (the usual AdamW rule)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the policy has no trainable parameter (everything frozen?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """torch AdamW, fused where every parameter's device has the fused kernel (CPU and CUDA do).

    The fused kernel is the same update in one pass over each tensor; the default for-loop implementation makes about
    ten passes (on one CPU thread, 0.26 s against 0.04 s for the 39 M parameters of a tiny model with Qwen's vocabulary).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # what AdamW itself checks

    params = [p for g in groups for p in g["params"]]
    supported = set(_get_fused_kernels_supported_devices())
    fused = bool(params) and all(p.device.type in supported and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
