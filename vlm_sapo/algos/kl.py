"""KL estimators against a reference policy, and train/rollout mismatch measurement and correction.

All functions take per-token log-probabilities ``[batch, tokens]`` of the sampled tokens; ``mask`` is 1 on
completion tokens. Masked positions are zeroed before any arithmetic, so padding may hold anything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlm_sapo.algos.aggregation import bool_mask

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_shapes(a_name: str, a: Tensor, b_name: str, b: Tensor, mask: Tensor | None = None) -> None:
    if b.shape != a.shape or (mask is not None and mask.shape != a.shape):
        shapes = f"{a_name} {tuple(a.shape)}, {b_name} {tuple(b.shape)}"
        raise ValueError(f"shapes differ: {shapes}" + ("" if mask is None else f", mask {tuple(mask.shape)}"))


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k3", *, max_log_ratio: float = 20.0
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi; ``[batch, tokens]``, 0 where masked.

    Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html. With
    log rho = ref_logp - logp: k1 = -log rho (unbiased, can be negative), k2 = (log rho)^2 / 2 (biased, low variance;
    its gradient is the KL's), k3 = (rho - 1) - log rho (unbiased, >= 0; GRPO's choice). log rho is clamped to
    +-max_log_ratio before exp. Reduce with ``vlm_sapo.algos.losses.aggregate`` like the policy loss.
    """
    _check_shapes("logp", logp, "ref_logp", ref_logp, mask)
    valid = bool_mask(mask)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = torch.where(valid, logp.to(dtype), 0.0)
    ref = torch.where(valid, ref_logp.detach().to(dtype), 0.0)
    log_rho = (ref - logp).clamp(-max_log_ratio, max_log_ratio)
    if estimator == "k1":
        kl = -log_rho
    elif estimator == "k2":
        kl = 0.5 * log_rho**2
    elif estimator == "k3":
        kl = torch.expm1(log_rho) - log_rho
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return torch.where(valid, kl, 0.0)


def truncated_is_weight(old_logp: Tensor, rollout_logp: Tensor, cap: float = 2.0) -> Tensor:
    """min(pi_old / pi_rollout, cap) per token, detached: corrects for the rollout engine sampling from a slightly
    different distribution than the learner computes (kernels, precision), without the variance of an uncapped ratio.

    Yao, Liu et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025),
    https://fengyao.notion.site/off-policy-rl. Apply by multiplying the advantages by it: the weight is positive, and
    every policy loss here is positively homogeneous in each token's advantage, so this equals weighting each token's
    loss (the losses ignore whatever it holds at masked positions).
    """
    _check_shapes("old_logp", old_logp, "rollout_logp", rollout_logp)
    if not cap > 0:
        raise ValueError(f"truncated_is_weight: cap must be > 0, got {cap!r}")
    diff = old_logp.detach().float() - rollout_logp.detach().float()
    return diff.clamp(max=math.log(cap)).exp()  # clamp before exp: never overflows; NaN stays NaN for the NaN guard


def mismatch_metrics(train_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the learner's log-probs are from the rollout engine's on the same tokens and weights.

    With d = train_logp - rollout_logp over valid tokens: mean and max |d|, mean of exp(d) - 1 (0 in expectation if
    the two agree as distributions), and the k1/k3 estimates of KL(pi_rollout || pi_train) (tokens are sampled by the
    rollout engine). All 0 when no token is valid.
    """
    _check_shapes("train_logp", train_logp, "rollout_logp", rollout_logp, mask)
    valid = bool_mask(mask)
    with torch.no_grad():
        d = torch.where(valid, train_logp.double() - rollout_logp.double(), 0.0)
        n = valid.sum().clamp(min=1)
        metrics = torch.stack(
            [
                d.abs().sum() / n,
                d.abs().amax() if d.numel() else d.new_zeros(()),
                torch.expm1(d).sum() / n,
                -d.sum() / n,
                (torch.expm1(d) - d).sum() / n,
            ]
        ).tolist()
    names = (
        "mismatch_logp_abs_diff_mean",
        "mismatch_logp_abs_diff_max",
        "mismatch_ratio_minus_one_mean",
        "mismatch_kl_k1",
        "mismatch_kl_k3",
    )
    return dict(zip(names, metrics))
