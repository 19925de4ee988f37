"""What `Learner.update` takes (an `UpdateBatch` and the `Objective` it minimises), the checks it runs on them before
any forward pass, and the weighted metric sums it reduces over ranks at the end."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_sapo.algos import get_policy_loss, mismatch_metrics, policy_loss_aggregation, truncated_is_weight
from vlm_sapo.learner import dist_env


@dataclass(frozen=True)
class Objective:
    """What an update minimises: the registered policy loss `loss` with its hyper-parameters (`hparams`; unset ones
    take the loss function's defaults), plus `kl_coef` x a KL estimate (`kl_estimator`: k1, k2, k3) to the reference
    policy, and, with `tis_cap`, truncated importance sampling against the rollout engine's logprobs. The trainer
    builds one from `algorithm`; every data-parallel rank must pass the same one."""

    loss: str = "sapo"
    hparams: dict[str, Any] = field(default_factory=dict)
    tis_cap: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


@dataclass
class UpdateBatch:
    """This rank's share of one mini-batch. `inputs` is a `build_policy_inputs` batch (with `completion_mask`); the
    logprob tensors and per-token `advantages` are `[B, L]`, aligned with `inputs["input_ids"]`; `advantages` may also
    be `[B]`. `old_logp=None` is the on-policy case (see `Learner.update`); `rollout_logp` (the engine's logprobs)
    adds the train/rollout mismatch metrics and is what `Objective.tis_cap` weighs against; `ref_logp` is needed
    when `Objective.kl_coef > 0`. Ranks must agree on which of them are None."""

    inputs: dict
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def on_policy(self) -> bool:
        return self.old_logp is None


class MetricSums:
    """Per-update metrics as weighted sums, reduced over ranks into means by `reduce`: keys in `per_token` are summed
    over tokens, the rest by the loss's aggregation weight; keys ending in `_max` are maxima."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.per_token = {"entropy"}

    def add(self, key: str, value: float, *, per_token: bool = False) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        if per_token:
            self.per_token.add(key)

    def put_means(self, metrics: dict[str, float], n_tokens: float) -> None:
        """Token means over this rank's batch (`_max` keys: maxima), kept as token-weighted sums."""
        for k, v in metrics.items():
            if k.endswith("_max"):
                self.maxes[k] = v
            else:
                self.sums[k] = v * n_tokens
                self.per_token.add(k)

    def add_mismatch(self, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> None:
        """Train/rollout mismatch metrics (pi_old against the engine's logprobs)."""
        self.put_means(mismatch_metrics(old_logp.cpu(), rollout_logp.cpu(), mask.cpu()), float(mask.sum()))

    def reduce(self, total_weight: float, total_tokens: float, device: torch.device) -> dict[str, float]:
        """Sums and maxima over ranks -> means (per_token keys over tokens, the rest over loss weight)."""
        keys = sorted(self.sums)
        summed = dist_env.all_reduce_sum([self.sums[k] for k in keys], device)
        maxes, mkeys = self.maxes, sorted(self.maxes)
        if mkeys and dist_env.world_size() > 1:
            t = torch.tensor([maxes[k] for k in mkeys], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            maxes = dict(zip(mkeys, t.tolist()))
        out = {k: v / (total_tokens if k in self.per_token else total_weight) for k, v in zip(keys, summed)}
        out.update(maxes)
        return out


@dataclass
class CheckedUpdate:
    """An update's inputs after `check_update`: the loss function and its aggregation, the full completion mask, the
    fp32 `[B, L]` advantages (times the truncated IS weight under `tis_cap`) and the metrics gathered so far."""

    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    mode: str
    max_length: int | None
    mask: torch.Tensor
    adv: torch.Tensor
    metrics: MetricSums


def check_update(batch: UpdateBatch, objective: Objective) -> CheckedUpdate:
    """Shapes, the options that need one another (KL needs ref_logp, TIS needs old and rollout logprobs), the loss by
    name; the off-policy mismatch metrics and truncated IS weights, which need no forward pass."""
    loss_fn = get_policy_loss(objective.loss)
    mode = policy_loss_aggregation(objective.loss)
    max_length = objective.hparams.get("max_length", _default(loss_fn, "max_length"))
    mask = completion_mask(batch.inputs)
    shape = tuple(mask.shape)
    old_logp, rollout_logp, advantages, tis_cap = batch.old_logp, batch.rollout_logp, batch.advantages, objective.tis_cap
    if not batch.on_policy:
        _check_shape("old_logp", old_logp, shape)
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, the batch {shape[0]}")
        advantages = advantages[:, None].expand(shape)
    _check_shape("advantages", advantages, shape)
    if objective.kl_coef > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        _check_shape("ref_logp", batch.ref_logp, shape)
    adv = advantages.float()
    metrics = MetricSums()
    if rollout_logp is not None:
        _check_shape("rollout_logp", rollout_logp, shape)
        if not batch.on_policy:
            metrics.add_mismatch(old_logp, rollout_logp, mask)
        if tis_cap is not None:
            if batch.on_policy:
                raise ValueError("tis_cap needs old_logp (the weights are taken before the first forward)")
            w = truncated_is_weight(old_logp, rollout_logp, tis_cap)
            adv = adv * w
            valid = mask.bool()
            metrics.add("tis_weight_mean", float(torch.where(valid, w, 0.0).sum()), per_token=True)
            metrics.add("tis_capped_frac", float((valid & (w >= tis_cap)).sum()), per_token=True)
    elif tis_cap is not None:
        raise ValueError("tis_cap needs rollout_logp")
    return CheckedUpdate(loss_fn, mode, max_length, mask, adv, metrics)


def completion_mask(batch: dict) -> torch.Tensor:
    mask = batch.get("completion_mask")
    if mask is None:
        raise KeyError(f"policy batch has no 'completion_mask' (keys: {sorted(batch)}); build it with "
                       f"build_policy_inputs")
    return mask


def _default(fn: Any, name: str) -> Any:
    p = inspect.signature(fn).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} (aligned with batch['input_ids'])")
