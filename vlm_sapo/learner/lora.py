"""LoRA adapters through peft.

Adapters go on the linear layers named by `target_modules` (peft's matching: a list of module-name suffixes or one
regular expression). Qwen-VL's vision blocks share names with the language model's MLP (gate_proj, up_proj,
down_proj), so with a frozen vision tower the tower is excluded from adapters as well: frozen means unchanged.
"""

from __future__ import annotations

import torch

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_MODULES_REGEX = r".*\.visual(\..*)?"


def apply_lora(model: torch.nn.Module, *, rank: int, alpha: float | None, dropout: float,
               target_modules: list[str] | tuple[str, ...] | str | None, exclude_vision: bool) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model: base weights frozen, only the adapters train."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    targets = list(DEFAULT_TARGET_MODULES) if target_modules is None else target_modules
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=VISION_MODULES_REGEX if exclude_vision else None,
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"LoRA target_modules {targets!r} match no layer of {type(model).__name__}: {e}") from e
