"""Policy losses for group-based RL, registered by name behind one signature.

Every loss is ``fn(logp, old_logp, advantages, mask, *, <hyper-parameters>) -> (loss, metrics)``:
``logp``/``old_logp``/``mask`` are ``[batch, tokens]``, ``advantages`` is ``[batch]`` (broadcast over tokens) or
``[batch, tokens]``, ``mask`` is 1 on completion tokens, ``loss`` is a scalar to minimise and ``metrics`` a
``dict[str, float]``. Hyper-parameters are keyword-only with defaults, so a recipe can check user values against
``inspect.signature``.

Aggregation is part of each loss's definition (the papers differ exactly there), so it is declared when the loss is
registered and exposed by ``policy_loss_aggregation`` (the modes: ``aggregation.py``). ``regime.py`` reads the
tensors of every call when an experiment asks for them.

Masked positions never reach the arithmetic: they are replaced by zeros first, so padding may hold anything (even NaN)
without changing the loss or the gradient, and a row with no valid token contributes nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from vlm_sapo.algos import regime
from vlm_sapo.algos.aggregation import (
    AGGREGATIONS,
    SEQ_MEAN_TOKEN_MEAN,
    SEQ_MEAN_TOKEN_SUM_NORM,
    TOKEN_MEAN,
    aggregate,
    bool_mask,
)


class PolicyLoss(Protocol):
    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **hparams: Any
    ) -> tuple[Tensor, dict[str, float]]: ...


LossFn = TypeVar("LossFn", bound=Callable[..., tuple[Tensor, dict[str, float]]])

_POLICY_LOSSES: dict[str, PolicyLoss] = {}
_AGGREGATION: dict[str, str] = {}
_POSITIONAL = ("logp", "old_logp", "advantages", "mask")


def register_policy_loss(name: str, *, aggregation: str) -> Callable[[LossFn], LossFn]:
    """Register a loss under ``name``; its signature is checked here so every loss can be configured the same way."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"policy loss {name!r}: aggregation {aggregation!r} is not one of {AGGREGATIONS}")

    def decorator(fn: LossFn) -> LossFn:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        if tuple(p.name for p in params[:4]) != _POSITIONAL or any(
            p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:4]
        ):
            raise TypeError(f"policy loss {name!r} must take ({', '.join(_POSITIONAL)}) first")
        for p in params[4:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise TypeError(f"policy loss {name!r}: hyper-parameter {p.name!r} must be keyword-only with a default")
        _POLICY_LOSSES[name] = fn
        _AGGREGATION[name] = aggregation
        return fn

    return decorator


def list_policy_losses() -> list[str]:
    return sorted(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in _POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {', '.join(list_policy_losses())}")
    return _POLICY_LOSSES[name]


def policy_loss_aggregation(name: str) -> str:
    get_policy_loss(name)
    return _AGGREGATION[name]


# ------------------------------------------------------------------------------------------------- observers
@dataclass
class _Batch:
    logp: Tensor  # masked positions are 0, gradient flows only from valid tokens
    log_ratio: Tensor  # log(pi / pi_old), clamped to +-max_log_ratio, 0 on masked positions
    adv: Tensor  # [batch, tokens], 0 on masked positions, detached
    valid: Tensor  # bool [batch, tokens]


def _prepare(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, max_log_ratio: float) -> _Batch:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [batch, tokens], got shape {tuple(logp.shape)}")
    for arg, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{arg} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.shape == logp.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected [batch] {tuple(logp.shape[:1])} "
            f"or [batch, tokens] {tuple(logp.shape)}"
        )
    if not max_log_ratio > 0:
        raise ValueError(f"max_log_ratio must be > 0, got {max_log_ratio!r}")
    # fp32 at least: bf16 log-probs would make exp(log-ratio) coarse exactly where clipping/gating decides.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    valid = bool_mask(mask)
    logp = torch.where(valid, logp.to(dtype), 0.0)
    old = torch.where(valid, old_logp.detach().to(dtype), 0.0)
    adv = torch.where(valid, advantages.detach().to(dtype).expand(valid.shape), 0.0)
    log_ratio = (logp - old).clamp(-max_log_ratio, max_log_ratio)
    return _Batch(logp=logp, log_ratio=log_ratio, adv=adv, valid=valid)


def _observe(name: str, logp: Tensor, b: _Batch, **extra: Tensor) -> None:
    if not regime.observing():
        return
    regime.notify(name, {"log_ratio": b.log_ratio.detach(), "adv": b.adv, "valid": b.valid,
                         "grad": torch.tensor(bool(logp.requires_grad)), **{k: v.detach() for k, v in extra.items()}})


def _mean(x: Tensor, where: Tensor) -> Tensor:
    return torch.where(where, x, 0.0).sum() / where.sum().clamp(min=1)


def _max(x: Tensor, where: Tensor) -> Tensor:
    top = torch.where(where, x, float("-inf")).amax()
    return torch.where(where.any(), top, 0.0)


def _quantile(x: Tensor, where: Tensor, q: float) -> Tensor:
    """The q-quantile (linear interpolation) of x over `where`; 0 when `where` is empty."""
    values = x[where].float()
    return torch.quantile(values, q) if values.numel() else x.new_zeros((), dtype=torch.float32)


def _floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    values = torch.stack([v.detach().to(torch.float64) for v in metrics.values()]).tolist()  # one device sync
    return dict(zip(metrics, values))


def _check_clip(name: str, clip_low: float, clip_high: float) -> None:
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"{name}: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low!r}, {clip_high!r}")


def _ppo_clip(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token min(r A, clip(r) A) and where the clip is active (its side zeroes the gradient)."""
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    clipped_low = (adv < 0) & (ratio < 1 - clip_low)
    clipped_high = (adv > 0) & (ratio > 1 + clip_high)
    return objective, clipped_low, clipped_high


def _clipped_policy_gradient(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                             clip_low: float, clip_high: float, max_log_ratio: float, mode: str,
                             max_length: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped token objective aggregated by ``mode``: GRPO, DAPO and Dr. GRPO differ only in these numbers."""
    _check_clip(name, clip_low, clip_high)
    b = _prepare(logp, old_logp, advantages, mask, max_log_ratio)
    ratio = b.log_ratio.exp()
    objective, low, high = _ppo_clip(ratio, b.adv, clip_low, clip_high)
    loss = -aggregate(objective, b.valid, mode, max_length=max_length)
    _observe(name, logp, b, clipped_low=low, clipped_high=high)
    with torch.no_grad():
        metrics = _clip_metrics(ratio, low, high, b.valid)
    return loss, _floats(metrics)


def _clip_metrics(ratio: Tensor, low: Tensor, high: Tensor, valid: Tensor) -> dict[str, Tensor]:
    return {
        "clip_frac_low": _mean(low.to(ratio.dtype), valid),
        "clip_frac_high": _mean(high.to(ratio.dtype), valid),
        "ratio_mean": _mean(ratio, valid),
        "ratio_max": _max(ratio, valid),
    }


@register_policy_loss("sapo", aggregation=SEQ_MEAN_TOKEN_MEAN)
def sapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """SAPO: a temperature-controlled sigmoid gate replaces the hard clip.

    Gao et al., "Soft Adaptive Policy Optimization", arXiv:2511.20347 (2025).
    Per token f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos where A > 0 else tau_neg; objective f(r) A, token
    mean per sequence then mean over sequences. Its gradient is w r A grad(log pi) with w = 4 p (1 - p),
    p = sigmoid(tau (r - 1)): w = 1 on-policy (the plain policy gradient) and decays smoothly as r leaves 1, so an
    off-policy token is down-weighted rather than dropped. tau_neg > tau_pos decays negative updates faster, because
    they push probability onto many unsampled tokens. The log-ratio is clamped to +-max_log_ratio before exp.

    Metrics: the gate weight w (mean, fraction < 0.5); per advantage sign (pos: A > 0, neg: A < 0) the coefficient
    c = w r of the token's gradient relative to the on-policy gradient A grad(log pi) (mean, p50, p99; 0 when no token
    has that sign): w is relative to the raw importance-weighted gradient r A grad(log pi), so c, not w, says how much
    of the on-policy step an off-policy token still takes (tau = 1: c peaks at about 1.57 near r = 2.06 and falls
    below 1 only past r = 3.47); the per-sequence variance of log r over valid tokens (the paper's Var_i; mean and max)
    and its bound (tau_i^2 / 4) Var_i on how far the token-averaged gate can sit from the sequence-level gate (mean),
    plus the ratio's mean and max.
    """
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"sapo: tau_pos and tau_neg must be > 0, got {tau_pos!r}, {tau_neg!r}")
    b = _prepare(logp, old_logp, advantages, mask, max_log_ratio)
    tau = torch.where(b.adv > 0, b.adv.new_tensor(tau_pos), b.adv.new_tensor(tau_neg))
    ratio = b.log_ratio.exp()
    x = tau * (ratio - 1)
    loss = -aggregate(torch.sigmoid(x) * (4 / tau) * b.adv, b.valid, SEQ_MEAN_TOKEN_MEAN)
    if regime.observing():
        with torch.no_grad():
            w_obs = 4 * torch.sigmoid(x) * torch.sigmoid(-x)
        _observe("sapo", logp, b, gate_weight=w_obs, gate_coef=w_obs * ratio, tau=tau)

    with torch.no_grad():
        weight = 4 * torch.sigmoid(x) * torch.sigmoid(-x)  # sigmoid(-x), not 1 - p: no cancellation near p = 1
        lengths = b.valid.sum(-1)
        seqs = lengths > 0
        n = lengths.clamp(min=1)
        seq_mean = b.log_ratio.sum(-1, keepdim=True) / n[:, None]
        var = torch.where(b.valid, (b.log_ratio - seq_mean) ** 2, 0.0).sum(-1) / n
        seq_tau = torch.where(b.valid, tau, 0.0).amax(-1)  # with per-token advantages, the larger (looser) bound
        metrics = {
            "gate_weight_mean": _mean(weight, b.valid),
            "gate_weight_lt_half_frac": _mean((weight < 0.5).to(weight.dtype), b.valid),
            "log_ratio_var_mean": _mean(var, seqs),
            "log_ratio_var_max": _max(var, seqs),
            "gate_bound_mean": _mean(seq_tau**2 / 4 * var, seqs),
            "ratio_mean": _mean(ratio, b.valid),
            "ratio_max": _max(ratio, b.valid),
        }
        coef = weight * ratio  # c = w r: the token's gradient relative to the on-policy gradient
        for sign, where in (("pos", b.valid & (b.adv > 0)), ("neg", b.valid & (b.adv < 0))):
            metrics[f"gate_coef_{sign}_mean"] = _mean(coef, where)
            metrics[f"gate_coef_{sign}_p50"] = _quantile(coef, where, 0.5)
            metrics[f"gate_coef_{sign}_p99"] = _quantile(coef, where, 0.99)
    return loss, _floats(metrics)


@register_policy_loss("gspo", aggregation=SEQ_MEAN_TOKEN_MEAN)
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: clip the sequence-level ratio s = exp(mean token log-ratio), the unit the reward is given to.

    Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071 (2025).
    Token form (GSPO-token): s_t = sg[s] * pi_t / sg[pi_t] has the value s and the gradient s * grad(log pi_t), so
    per-token advantages are allowed and, with one advantage per sequence, the gradient equals GSPO's.
    Objective min(s_t A, clip(s_t, 1 - clip_low, 1 + clip_high) A), token mean per sequence then mean over
    sequences. The clip range is tiny because a sequence ratio is a geometric mean. ratio_* metrics are over sequences.
    """
    _check_clip("gspo", clip_low, clip_high)
    b = _prepare(logp, old_logp, advantages, mask, max_log_ratio)
    lengths = b.valid.sum(-1)
    seq_log_ratio = (b.log_ratio.sum(-1) / lengths.clamp(min=1)).detach()
    ratio = (seq_log_ratio[:, None] + b.logp - b.logp.detach()).exp()
    objective, low, high = _ppo_clip(ratio, b.adv, clip_low, clip_high)
    loss = -aggregate(objective, b.valid, SEQ_MEAN_TOKEN_MEAN)
    _observe("gspo", logp, b, clipped_low=low, clipped_high=high, seq_log_ratio=seq_log_ratio)
    with torch.no_grad():
        seq_ratio, seqs = seq_log_ratio.exp(), lengths > 0
        metrics = _clip_metrics(ratio, low, high, b.valid)
        metrics["ratio_mean"], metrics["ratio_max"] = _mean(seq_ratio, seqs), _max(seq_ratio, seqs)
    return loss, _floats(metrics)


@register_policy_loss("grpo", aggregation=SEQ_MEAN_TOKEN_MEAN)
def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: PPO's token-level clipped objective with group-relative advantages, no critic.

    Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300 (2024); the clip is PPO's (Schulman et al., arXiv:1707.06347).
    Objective min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), token mean per sequence then mean over sequences.
    The paper's KL term is not part of the loss here: see ``vlm_sapo.algos.kl`` (off by default).
    """
    return _clipped_policy_gradient("grpo", logp, old_logp, advantages, mask, clip_low, clip_high, max_log_ratio,
                                    SEQ_MEAN_TOKEN_MEAN)


@register_policy_loss("dapo", aggregation=TOKEN_MEAN)
def dapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """DAPO: clip-higher (a wider upper band keeps low-probability tokens rising) and token-level averaging.

    Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476 (2025).
    Objective min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), mean over all valid tokens of the batch, so a long
    answer counts per token rather than being diluted. Dynamic sampling is the trainer's zero-variance filter.
    """
    return _clipped_policy_gradient("dapo", logp, old_logp, advantages, mask, clip_low, clip_high, max_log_ratio,
                                    TOKEN_MEAN)


@register_policy_loss("drgrpo", aggregation=SEQ_MEAN_TOKEN_SUM_NORM)
def drgrpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    max_length: int = 1024,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: GRPO without its length bias: token sums divided by one constant instead of each answer's length.

    Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783 (2025).
    Objective min(r A, clip(r) A) summed over each sequence's tokens, divided by ``max_length``, mean over sequences.
    Set ``max_length`` to the rollout's maximum number of new tokens; it only rescales the loss (like a learning
    rate), but a sequence longer than it means the setting is wrong, so that raises. Pair with the ``drgrpo``
    advantage (no std scaling).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"drgrpo: max_length must be an int >= 1, got {max_length!r}")
    longest = int(bool_mask(mask).sum(-1).amax()) if mask.numel() else 0
    if longest > max_length:
        raise ValueError(f"drgrpo: a sequence has {longest} valid tokens > max_length={max_length}")
    return _clipped_policy_gradient("drgrpo", logp, old_logp, advantages, mask, clip_low, clip_high, max_log_ratio,
                                    SEQ_MEAN_TOKEN_SUM_NORM, max_length=max_length)


@register_policy_loss("cispo", aggregation=TOKEN_MEAN)
def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_high: float = 4.0,
    clip_low: float | None = None,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """CISPO: clip the (detached) importance weight, not the update, so every token keeps a gradient.

    MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv:2506.13585 (2025).
    Loss -sg[clip(r, 1 - clip_low, 1 + clip_high)] A log pi, mean over all valid tokens of the batch. The paper
    tunes only the upper bound and leaves the lower one off (``clip_low=None``); it does not publish its value, so the
    default cap 1 + 4.0 = 5 is this project's choice. The loss value is not a surrogate objective (it scales with
    log pi); only its gradient sg[w] A grad(log pi) is meaningful.
    """
    if not clip_high >= 0 or (clip_low is not None and not 0 <= clip_low < 1):
        raise ValueError(f"cispo: need clip_high >= 0 and clip_low None or in [0, 1), got {clip_high!r}, {clip_low!r}")
    b = _prepare(logp, old_logp, advantages, mask, max_log_ratio)
    ratio = b.log_ratio.exp().detach()
    lower = 0.0 if clip_low is None else 1 - clip_low
    weight = ratio.clamp(lower, 1 + clip_high)
    loss = -aggregate(weight * b.adv * b.logp, b.valid, TOKEN_MEAN)
    with torch.no_grad():
        metrics = _clip_metrics(ratio, ratio < lower, ratio > 1 + clip_high, b.valid)
    return loss, _floats(metrics)


def _binary_kl(old_logp: Tensor, logp: Tensor) -> Tensor:
    """KL(Bernoulli(mu) || Bernoulli(p)) from log-probabilities (<= 0): the sampled token against all others.

    mu log(mu / p) + (1 - mu) log((1 - mu) / (1 - p)), with log(1 - x) as log(-expm1(log x)) so probabilities near
    1 keep their precision; the second term is 0 when mu = 1 and +inf when p = 1 > mu.
    """
    mu = old_logp.exp()
    rest = (1 - mu) * (torch.log(-torch.expm1(old_logp)) - torch.log(-torch.expm1(logp)))
    return mu * (old_logp - logp) + torch.where(mu < 1, rest, 0.0)


def _dppo(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
          clip_high: float, ratio_cap: float, max_log_ratio: float, divergence: str) -> tuple[Tensor, dict[str, float]]:
    """DPPO's masked policy gradient: -sg[min(r, ratio_cap)] A log pi on tokens inside the trust region."""
    if not (clip_low >= 0 and clip_high >= 0 and ratio_cap > 0):
        raise ValueError(f"{name}: need clip_low >= 0, clip_high >= 0 and ratio_cap > 0, got {clip_low!r}, "
                         f"{clip_high!r}, {ratio_cap!r}")
    b = _prepare(logp, old_logp, advantages, mask, max_log_ratio)
    with torch.no_grad():
        new = b.logp.detach().clamp(max=0.0)  # log-probabilities; 0 on masked positions
        old = torch.where(b.valid, old_logp.detach().to(new.dtype), 0.0).clamp(max=0.0)
        if divergence == "tv":  # pi - pi_old: its sign is the direction of the move
            delta = new.exp() - old.exp()
            out_high, out_low = delta > clip_high, delta < -clip_low
        else:
            kl = _binary_kl(old, new)
            out_high, out_low = (new > old) & (kl > clip_high), (new < old) & (kl > clip_low)
        # Only the update that pushes further out is dropped: A > 0 raises pi, A < 0 lowers it.
        masked_high = b.valid & (b.adv > 0) & out_high
        masked_low = b.valid & (b.adv < 0) & out_low
        keep = ~(masked_high | masked_low)
        ratio = b.log_ratio.exp()
        weight = ratio.clamp(max=ratio_cap)
    loss = -aggregate(torch.where(keep, weight * b.adv * b.logp, 0.0), b.valid, TOKEN_MEAN)
    with torch.no_grad():
        metrics = _clip_metrics(ratio, masked_low, masked_high, b.valid)
        metrics["ratio_capped_frac"] = _mean((ratio > ratio_cap).to(ratio.dtype), b.valid)
    return loss, _floats(metrics)


@register_policy_loss("dppo_tv", aggregation=TOKEN_MEAN)
def dppo_tv_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.15,
    clip_high: float = 0.15,
    ratio_cap: float = 20.0,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPPO-Binary-TV: a trust region on the probability change of the sampled token, not on its ratio.

    Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning" (DPPO), arXiv:2602.04879 (2026).
    PPO's ratio clip over-constrains rare tokens (a 1e-5 -> 1e-4 move is a ratio of 10) and under-constrains common
    ones; the binary total variation |pi - pi_old| of the sampled token (a lower bound of the full TV) does neither.
    Loss -sg[min(r, ratio_cap)] A log pi (r = pi / pi_old, the importance weight of a REINFORCE update), where a
    token is dropped when its update would push it further out of the region: A > 0 and pi - pi_old > clip_high, or
    A < 0 and pi - pi_old < -clip_low. Token mean over the batch. As with CISPO only the gradient is meaningful.

    Defaults: thresholds 0.15 as in the authors' recipe (verl examples/dppo_trainer); ratio_cap 20 is verl's
    `clip_ratio_c` default (the authors' code uses 10, their recipe 1e4: truncation biases against rare tokens,
    paper section 5.4). The region is anchored at old_logp, the learner's pi_old, as in verl's `dppo_tv`; the paper
    prefers the rollout engine's policy as the anchor (its "recompute" variant is this one). Metrics:
    clip_frac_low/high (masked fractions by side), ratio_capped_frac, ratio_mean/max.
    """
    return _dppo("dppo_tv", logp, old_logp, advantages, mask, clip_low, clip_high, ratio_cap, max_log_ratio, "tv")


@register_policy_loss("dppo_kl", aggregation=TOKEN_MEAN)
def dppo_kl_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.05,
    clip_high: float = 0.05,
    ratio_cap: float = 20.0,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPPO-Binary-KL: the trust region of `dppo_tv` measured by the binary KL of the sampled token.

    Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning" (DPPO), arXiv:2602.04879 (2026).
    D = KL(Bernoulli(pi_old) || Bernoulli(pi)) over {sampled token, everything else}; a token is dropped when A > 0,
    pi > pi_old and D > clip_high, or A < 0, pi < pi_old and D > clip_low. Loss, weight, aggregation, anchor and
    metrics as `dppo_tv`; thresholds 0.05 as in the authors' recipe (verl examples/dppo_trainer).
    """
    return _dppo("dppo_kl", logp, old_logp, advantages, mask, clip_low, clip_high, ratio_cap, max_log_ratio, "kl")
