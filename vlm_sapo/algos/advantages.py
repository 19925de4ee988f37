"""Group-relative advantage estimators, registered by name behind one signature.

Every estimator is ``fn(rewards, group_size, *, <hyper-parameters>) -> advantages``. ``rewards`` holds one scalar per
completion, either flat ``[num_prompts * group_size]`` with each prompt's ``group_size`` completions contiguous, or
``[num_prompts, group_size]``; the result has the same shape as ``rewards`` (float32 unless ``rewards`` is already
floating) and is broadcast over a completion's tokens by the policy loss.

A group whose rewards are all equal carries no signal about which completion is better: it gets exactly 0, not a
rounding residue (mean of equal floats is not always that float) that std-scaling could blow up.

An estimator registered with ``components=True`` (``gdpo``) takes the named reward components instead of one scalar:
``rewards`` is ``[num_prompts * group_size, C]`` or ``[num_prompts, group_size, C]`` and the result drops the last
axis. ``takes_components(name)`` tells a trainer which input to build.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor


class AdvantageEstimator(Protocol):
    def __call__(self, rewards: Tensor, group_size: int, **hparams: Any) -> Tensor: ...


EstimatorFn = TypeVar("EstimatorFn", bound=Callable[..., Tensor])

_ESTIMATORS: dict[str, AdvantageEstimator] = {}
_TAKES_COMPONENTS: set[str] = set()


def register_advantage_estimator(name: str, *, components: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register an estimator under ``name``; hyper-parameters must be keyword-only with defaults.

    ``components=True``: the estimator takes reward components ``[..., C]`` (see the module docstring).
    """

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        if [p.name for p in params[:2]] != ["rewards", "group_size"]:
            raise TypeError(f"advantage estimator {name!r} must take (rewards, group_size) first")
        for p in params[2:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise TypeError(f"advantage estimator {name!r}: {p.name!r} must be keyword-only with a default")
        _ESTIMATORS[name] = fn
        if components:
            _TAKES_COMPONENTS.add(name)
        return fn

    return decorator


def takes_components(name: str) -> bool:
    """Whether estimator ``name`` takes named reward components ``[..., C]`` rather than one scalar reward."""
    get_advantage_estimator(name)
    return name in _TAKES_COMPONENTS


def list_advantage_estimators() -> list[str]:
    return sorted(_ESTIMATORS)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {', '.join(list_advantage_estimators())}")
    return _ESTIMATORS[name]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """View ``rewards`` as ``[num_prompts, group_size]`` (floating), with a clear error on bad input."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.dim() == 1:
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of {group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size is {group_size}")
        grouped = rewards
    else:
        raise ValueError(
            f"rewards must be [num_prompts * group_size] or [num_prompts, group_size], got {tuple(rewards.shape)}"
        )
    if not grouped.is_floating_point():
        grouped = grouped.to(torch.float32)
    bad = ~torch.isfinite(grouped)
    if bad.any():
        flat = bad.reshape(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"rewards must be finite; non-finite at flat index {flat} (completion i is prompt i // {group_size})"
        )
    return grouped.detach()


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Bool ``[num_prompts]``: True where every completion of the prompt got the same reward (exact equality)."""
    grouped = _groups(rewards, group_size)
    return grouped.amax(-1) == grouped.amin(-1)


def _centred(grouped: Tensor) -> tuple[Tensor, Tensor]:
    flat = (grouped.amax(-1) == grouped.amin(-1))[:, None]
    return torch.where(flat, 0.0, grouped - grouped.mean(-1, keepdim=True)), flat


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: Tensor, group_size: int, *, scale_std: bool = True, epsilon: float = 1e-6) -> Tensor:
    """(r - group mean) / (group std + epsilon), std with Bessel's correction (n - 1) as in common GRPO code.

    Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300 (2024). ``scale_std=False`` gives Dr. GRPO's unscaled form.
    """
    if not epsilon >= 0:
        raise ValueError(f"grpo advantages: epsilon must be >= 0, got {epsilon!r}")
    grouped = _groups(rewards, group_size)
    adv, flat = _centred(grouped)
    if scale_std and group_size > 1:
        std = grouped.std(-1, keepdim=True, correction=1)
        adv = torch.where(flat, 0.0, adv / (std + epsilon))
    return adv.reshape(rewards.shape)


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """r - group mean, no std scaling: scaling by std up-weights prompts that are nearly always right or wrong.

    Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783 (2025).
    """
    adv, _ = _centred(_groups(rewards, group_size))
    return adv.reshape(rewards.shape)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """r_i - mean of the other G - 1 rewards of the group: a baseline independent of the sample it scores.

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs", arXiv:2402.14740 (2024); Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (ICLR 2019 DeepRLStructPred).
    """
    grouped = _groups(rewards, group_size)
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    flat = (grouped.amax(-1) == grouped.amin(-1))[:, None]
    return torch.where(flat, 0.0, grouped - others).reshape(rewards.shape)


def _component_groups(rewards: Tensor, group_size: int) -> Tensor:
    """View component rewards as ``[num_prompts, group_size, C]`` (floating, finite), with clear errors."""
    if rewards.dim() == 2:
        flat = rewards
    elif rewards.dim() == 3:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size is {group_size}")
        flat = rewards.reshape(-1, rewards.shape[-1])
    else:
        raise ValueError(f"component rewards must be [num_prompts * group_size, C] or [num_prompts, group_size, C], "
                         f"got {tuple(rewards.shape)}")
    if flat.shape[-1] < 1:
        raise ValueError("component rewards have no component (C = 0)")
    per_component = [_groups(flat[:, k], group_size) for k in range(flat.shape[-1])]  # checks size and finiteness
    return torch.stack(per_component, dim=-1)


@register_advantage_estimator("gdpo", components=True)
def gdpo_advantages(rewards: Tensor, group_size: int, *, weights: tuple[float, ...] | None = None,
                    epsilon: float = 1e-6) -> Tensor:
    """Each reward component normalised within its group, weighted sum, then divided by the batch std.

    Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization",
    arXiv:2601.05242 (2026). GRPO on a summed reward lets the component with the larger spread decide every sign
    (and maps distinct component combinations to one advantage); GDPO gives each component its own unit scale:
        A_k = (r_k - group mean) / (group std + epsilon)  (as `grpo`: Bessel std, exactly 0 for a flat component)
        A   = sum_k w_k A_k,   then   A / (std of A over the batch + epsilon)  (Bessel std, all completions).
    The batch mean is not subtracted: every group's A already sums to 0, so the mean is 0 up to rounding, and
    subtracting that residue would break "a group whose components are all flat gets exactly 0" (TRL's
    `normalize_then_sum` subtracts it and uses epsilon 1e-4 at both steps; verl's `gdpo` whitens over tokens).
    ``weights``: one per component, default 1. The batch is what the caller passes (one rank's prompts).
    """
    if not epsilon >= 0:
        raise ValueError(f"gdpo advantages: epsilon must be >= 0, got {epsilon!r}")
    grouped = _component_groups(rewards, group_size)
    n_comp = grouped.shape[-1]
    w = [1.0] * n_comp if weights is None else [float(x) for x in weights]
    if len(w) != n_comp or not all(torch.isfinite(torch.tensor(w))):
        raise ValueError(f"gdpo advantages: need {n_comp} finite weights (one per component), got {weights!r}")
    summed = torch.zeros(grouped.shape[:2], dtype=grouped.dtype)
    for k in range(n_comp):
        summed = summed + w[k] * grpo_advantages(grouped[..., k], group_size, epsilon=epsilon)
    flat = (grouped.amax(1) == grouped.amin(1)).all(-1)[:, None]  # every component flat in the group
    std = summed.std(correction=1) if summed.numel() > 1 else summed.new_zeros(())
    adv = torch.where(flat, 0.0, summed / (std + epsilon))
    return adv.reshape(rewards.shape[:-1])
