"""Qwen2-VL / Qwen2.5-VL mRoPE after a video: where the text positions continue.

Qwen2-VL and Qwen2.5-VL (as released, and as vLLM computes them) continue the text after a vision block at
1 + the largest position id of that block over all three axes. For a video the temporal axis counts too, and on
Qwen2.5-VL it is stretched by `tokens_per_second * second_per_grid_t` (4 per temporal patch on the tiny model,
(T - 1) * 2 on the released ones at 2 fps). transformers 5.3+ continues after `max(h, w) / merge` instead, ignoring
the temporal axis (huggingface/transformers#45381), so with transformers 5.19 every token after a video sits at a
different position than in vLLM: video prompts' logprobs differed by 1.9e-3 to 5.0e-3 on the tiny Qwen2.5-VL
(measured; `tests/rollout/test_vllm_engine.py`), 1.9e-6 with this rule.
Images (T = 1) and Qwen3-VL (one temporal patch per timestamped frame group) are unaffected.

`continue_after_video` shifts the positions after each video block to the released rule; `use_released_video_rope`
installs it on a model's `get_rope_index`, which generate() and the forward both call, so the HF engine, the learner
and vLLM all score the same sequence.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

VIDEO = 2  # mm_token_type_ids value of video tokens
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def continue_after_video(position_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`position_ids` [3, B, T] with everything after a video block moved to start at 1 + the block's largest id,
    and the matching rope deltas [B, 1] (largest id + 1 - sequence length) that generate() continues from."""
    out = position_ids.clone()
    deltas = []
    for b in range(out.shape[1]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(mm_token_type_ids[b],
                                                                                          dtype=torch.bool)
        pos = out[:, b, keep]
        types = mm_token_type_ids[b][keep].tolist()
        start = 0
        for kind, run in itertools.groupby(types):
            end = start + len(list(run))
            if kind == VIDEO and end < pos.shape[1]:
                pos[:, end:] += pos[:, start:end].max() + 1 - pos[:, end].min()
            start = end
        out[:, b, keep] = pos
        deltas.append(int(pos.max()) + 1 - pos.shape[1] if pos.numel() else 0)
    return out, torch.tensor(deltas, device=out.device, dtype=out.dtype).unsqueeze(1)


def use_released_video_rope(model: Any) -> None:
    """Make a Qwen2-VL / Qwen2.5-VL model's `get_rope_index` follow the released rule (see the module docstring).

    Idempotent; other families are left alone. `model` is the ForConditionalGeneration or its backbone.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return
    backbone = model.model if hasattr(model, "lm_head") else model
    original = backbone.get_rope_index
    if getattr(original, "_vlm_sapo_released_video_rope", False):
        return

    @functools.wraps(original)
    def get_rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None, *args: Any,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        positions, deltas = original(input_ids, mm_token_type_ids, *args, attention_mask=attention_mask, **kwargs)
        if mm_token_type_ids is None or not bool((mm_token_type_ids == VIDEO).any()):
            return positions, deltas
        return continue_after_video(positions, mm_token_type_ids, attention_mask)

    get_rope_index._vlm_sapo_released_video_rope = True  # type: ignore[attr-defined]
    backbone.get_rope_index = get_rope_index
