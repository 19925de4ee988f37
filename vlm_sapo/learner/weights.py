"""Full policy weights under Hugging Face names, for the rollout engine's weight sync and for export.

LoRA adapters are merged out of place (W + B A * scaling, computed per layer, never written back), so the training
weights stay exact. Under ZeRO-3 each parameter (with its adapters) is gathered only while it is yielded: every rank
must drain the generator, because each gather is a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _gathered(params: list[torch.nn.Parameter], zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no adapters to merge
        return {}
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the module itself)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def named_full_weights(module: torch.nn.Module, *, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF state_dict name, full detached tensor) per parameter; tied parameters appear once, under their first name.

    Without ZeRO-3 the tensors are views of the live parameters: copy them if they must outlive the next update.
    """
    base = hf_model(module)
    lora = _lora_layers(base)
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner_name, sep, rest = name.rpartition(".base_layer.")
        owner = lora.get(owner_name) if sep else None
        hf_name = f"{owner_name}.{rest}" if sep else name
        if owner is None or rest != "weight" or getattr(owner, "merged", False):
            with _gathered([param], zero3):
                yield hf_name, (param.detach().clone() if zero3 else param.detach())
            continue
        adapters = [a for a in owner.active_adapters if a in owner.lora_A]
        extra = [p for a in adapters for p in (owner.lora_A[a].weight, owner.lora_B[a].weight)]
        with _gathered([param, *extra], zero3), torch.no_grad():
            merged = param.detach().clone()
            for a in adapters:
                merged += owner.get_delta_weight(a).to(merged.dtype)
            yield hf_name, merged
