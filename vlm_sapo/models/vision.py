"""The Qwen-VL vision tower: finding it across transformers' layouts, and freezing it.

Used by the learner (`model.freeze_vision_tower`) and the demo's cold start, which must freeze the same parameters.
"""

from __future__ import annotations

import torch


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen-VL vision encoder including its patch merger (`model.model.visual` in transformers 5)."""
    for owner in (getattr(model, "model", None), model):
        visual = getattr(owner, "visual", None) if owner is not None else None
        if isinstance(visual, torch.nn.Module):
            return visual
    raise ValueError(f"{type(model).__name__} has no `visual` module; freeze_vision_tower needs a Qwen-VL model")


def freeze_vision_params(model: torch.nn.Module) -> int:
    """Stop gradients into the vision encoder; returns how many parameters were frozen."""
    n = 0
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n
