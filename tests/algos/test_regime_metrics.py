"""`observe_policy_losses` + `regime_metrics` (what benchmarks/sapo_regime.py reports) against hand computations:
per-sign clip fractions (GRPO tokens, GSPO sequences), ratio and Var_i quantiles, SAPO's w, c = w r and bound."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_sapo.algos import get_policy_loss, observe_policy_losses, regime_metrics


def _observed(name: str, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              **hp: float) -> tuple[list[tuple[str, dict]], torch.Tensor, dict]:
    seen: list[tuple[str, dict]] = []
    with observe_policy_losses(lambda n, t: seen.append((n, t))):
        loss, metrics = get_policy_loss(name)(logp, old, adv, mask, **hp)
    return seen, loss, metrics


def _pvar(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def _lin_quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (pos - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def test_grpo_token_clip_fractions_per_sign_ratio_and_var_quantiles() -> None:
    ratios = [[1.5, 1.1, 1.0], [0.5, 0.9, 7.0]]  # the last token of row 1 is padding: it must not count
    old = torch.zeros(2, 3)
    logp = torch.tensor(ratios).log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    seen, _, _ = _observed("grpo", logp, old, adv, mask, clip_low=0.2, clip_high=0.27)
    assert [n for n, _ in seen] == ["grpo"] and not bool(seen[0][1]["grad"])
    m = regime_metrics("grpo", seen[0][1])
    assert m["clip_frac_pos"] == pytest.approx(1 / 3)  # 1.5 > 1.27 among the three A > 0 tokens
    assert m["clip_frac_neg"] == pytest.approx(1 / 2)  # 0.5 < 0.8 among the two valid A < 0 tokens
    valid = [1.5, 1.1, 1.0, 0.5, 0.9]
    assert m["ratio_p50"] == pytest.approx(1.0)
    assert m["ratio_p99"] == pytest.approx(_lin_quantile(valid, 0.99))
    assert m["ratio_max"] == pytest.approx(1.5)
    var = [_pvar([math.log(r) for r in ratios[0]]), _pvar([math.log(0.5), math.log(0.9)])]
    assert m["var_p50"] == pytest.approx(sum(var) / 2)
    assert m["var_p90"] == pytest.approx(_lin_quantile(var, 0.9))
    assert m["var_max"] == pytest.approx(max(var))
    assert "w_pos_p50" not in m  # SAPO's gate quantities only for SAPO


def test_gspo_clip_fractions_count_sequences() -> None:
    old = torch.zeros(3, 2)
    logp = torch.tensor([[0.02, 0.0], [0.001, -0.001], [-0.01, -0.01]])  # seq log-ratio 0.01, 0, -0.01
    adv = torch.tensor([1.0, 1.0, -1.0])
    seen, _, _ = _observed("gspo", logp, old, adv, torch.ones(3, 2))
    m = regime_metrics("gspo", seen[0][1])
    assert m["clip_frac_pos"] == pytest.approx(1 / 2)  # exp(0.01) > 1 + 4e-4; exp(0) is inside
    assert m["clip_frac_neg"] == pytest.approx(1.0)  # exp(-0.01) < 1 - 3e-4
    assert m["ratio_max"] == pytest.approx(math.exp(0.02))  # token ratios, as for every loss


def test_sapo_gate_weight_coefficient_and_bound_quantiles() -> None:
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(2.0), 0.0], [math.log(0.5), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    seen, _, metrics = _observed("sapo", logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    m = regime_metrics("sapo", seen[0][1])

    def w(r: float, tau: float) -> float:
        s = 1 / (1 + math.exp(-tau * (r - 1)))
        return 4 * s * (1 - s)

    w2, wn = w(2.0, 1.0), w(0.5, 1.05)
    assert m["w_pos_p1"] == pytest.approx(w2 + 0.01 * (1 - w2))
    assert m["w_pos_p50"] == pytest.approx((w2 + 1) / 2)
    assert m["c_pos_p50"] == pytest.approx((2 * w2 + 1) / 2)
    assert m["c_pos_max"] == pytest.approx(2 * w2)  # 2 w(2) = 1.57 > 1: the c peak of the README
    assert m["w_neg_p50"] == pytest.approx(wn) and m["c_neg_p99"] == pytest.approx(0.5 * wn)
    var0 = _pvar([math.log(2.0), 0.0])
    assert m["bound_p50"] == pytest.approx((1.0**2 / 4 * var0 + 0.0) / 2)
    assert m["bound_max"] == pytest.approx(var0 / 4)
    # the same numbers as the loss's own logged means
    assert metrics["gate_coef_pos_p50"] == pytest.approx(m["c_pos_p50"])
    assert metrics["log_ratio_var_max"] == pytest.approx(m["var_max"])


def test_a_sign_with_no_token_gives_nan_not_zero() -> None:
    seen, _, _ = _observed("grpo", torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    m = regime_metrics("grpo", seen[0][1])
    assert m["clip_frac_pos"] == 0.0 and math.isnan(m["clip_frac_neg"])


def test_observer_changes_nothing_and_flags_backward_calls() -> None:
    torch.manual_seed(0)
    old = torch.randn(3, 4) * 0.1
    base = (old + torch.randn(3, 4) * 0.05)
    adv, mask = torch.tensor([1.0, -0.5, 0.3]), torch.ones(3, 4)
    for name in ("sapo", "gspo", "grpo", "dapo"):
        logp = base.clone().requires_grad_()
        loss, _ = get_policy_loss(name)(logp, old, adv, mask)
        (g_plain,) = torch.autograd.grad(loss, logp)
        logp2 = base.clone().requires_grad_()
        seen, loss2, _ = _observed(name, logp2, old, adv, mask)
        (g_obs,) = torch.autograd.grad(loss2, logp2)
        assert torch.equal(loss, loss2) and torch.equal(g_plain, g_obs)
        assert len(seen) == 1 and bool(seen[0][1]["grad"])  # inside a backward pass: the benchmark skips these
    seen: list = []
    get_policy_loss("sapo")(base, old, adv, mask)  # no observer installed: nothing recorded
    assert seen == []
