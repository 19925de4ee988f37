"""DAPO's overlong reward shaping: a length penalty that ramps up over the last tokens before the generation limit.

Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476 (2025), section 3.4
(Overlong Reward Shaping: soft overlong punishment). With L_max the generation limit (`rollout.max_new_tokens`) and L_cache the buffer:

    R_length(y) = 0                                    |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                = -1                                   L_max < |y|

times `penalty_factor` (verl's `overlong_buffer.penalty_factor`; the paper's is 1), added to the task reward before
advantages are computed. A truncated answer (|y| = L_max) gets the full -penalty_factor; a completion that stops in
the buffer gets part of it, so the policy is told "shorter" before it is told "cut off". Overlong filtering (masking
truncated samples out of the loss, the paper's other remedy) is the trainer's: it needs the finish reasons.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty_factor: float = 1.0) -> Tensor:
    """R_length of each completion (<= 0, float32) from its token count; see the module docstring."""
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be an int in [1, max_new_tokens={max_new_tokens}], got {buffer!r}")
    if not penalty_factor > 0:
        raise ValueError(f"overlong penalty_factor must be > 0, got {penalty_factor!r}")
    if lengths.dtype.is_floating_point or (lengths.numel() and int(lengths.min()) < 0):
        raise ValueError("lengths must be non-negative integer token counts")
    expected = max_new_tokens - buffer
    ramp = (expected - lengths.to(torch.float64)) / buffer
    return (ramp.clamp(min=-1.0, max=0.0) * penalty_factor).to(torch.float32)
