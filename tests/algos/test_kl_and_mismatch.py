"""KL estimators (against the formulas and a Monte-Carlo check of unbiasedness), truncated IS, mismatch metrics."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_sapo.algos import kl_penalty, mismatch_metrics, truncated_is_weight


def test_estimators_match_schulman_formulas():
    logp = torch.tensor([[-1.0, -2.0, -0.1, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.1, -0.2]])
    mask = torch.tensor([[1, 1, 1, 0]])
    for name, formula in [
        ("k1", lambda lr: -lr),
        ("k2", lambda lr: 0.5 * lr**2),
        ("k3", lambda lr: math.exp(lr) - 1 - lr),
    ]:
        got = kl_penalty(logp, ref, mask, name)
        expected = [
            formula(r - p) if m else 0.0 for p, r, m in zip(logp[0].tolist(), ref[0].tolist(), mask[0].tolist())
        ]
        torch.testing.assert_close(got[0], torch.tensor(expected), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, mask, "k4")


def test_k1_and_k3_are_unbiased_for_kl_of_the_sampling_policy():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, generator=g), 0).double()  # the policy, which samples
    p = torch.softmax(torch.randn(6, generator=g), 0).double()  # the reference
    exact = float((q * (q / p).log()).sum())
    samples = torch.multinomial(q, 200_000, replacement=True, generator=g)
    logp, ref = q.log()[samples][None, :], p.log()[samples][None, :]
    mask = torch.ones_like(logp)
    for name in ("k1", "k3"):
        per_token = kl_penalty(logp, ref, mask, name)
        stderr = float(per_token.std()) / math.sqrt(per_token.numel())
        assert abs(float(per_token.mean()) - exact) < 4 * stderr, (name, float(per_token.mean()), exact)
    assert torch.all(kl_penalty(logp, ref, mask, "k3") >= 0)


def test_kl_ignores_padding_and_stays_finite():
    logp = torch.tensor([[-1.0, float("nan"), -1e4], [float("-inf"), -2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, float("inf"), -1.0], [-1.0, -2.5, float("nan")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    kl = kl_penalty(logp, ref, mask, "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()
    assert kl[0, 1] == 0 and kl[1, 0] == 0 and kl[1, 2] == 0
    assert logp.grad[0, 1] == 0 and logp.grad[1, 0] == 0 and logp.grad[1, 2] == 0


def test_truncated_is_weight():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0, -1e3]], requires_grad=True)
    rollout = torch.tensor([[-1.2, -1.0, -0.5, -1e3, 0.0]])
    w = truncated_is_weight(old, rollout, cap=2.0)
    expected = [min(math.exp(min(o - r, 700.0)), 2.0) for o, r in zip(old[0].tolist(), rollout[0].tolist())]
    torch.testing.assert_close(w[0], torch.tensor(expected), rtol=1e-6, atol=0)
    assert not w.requires_grad and torch.isfinite(w).all()
    assert w[0, 3] == 2.0 and w[0, 4] == 0.0
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weight(old, rollout, cap=0.0)


def test_mismatch_metrics():
    train = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-0.1, -3.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.1, -1.9, -0.5, float("nan")], [-0.3, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    d = [0.1, -0.1, 0.0, 0.2, 0.0]  # train - rollout over the five valid tokens
    m = mismatch_metrics(train, rollout, mask)
    assert m["mismatch_logp_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in d) / 5, rel=1e-5)
    assert m["mismatch_logp_abs_diff_max"] == pytest.approx(0.2, rel=1e-5)
    assert m["mismatch_ratio_minus_one_mean"] == pytest.approx(sum(math.exp(x) - 1 for x in d) / 5, rel=1e-5)
    assert m["mismatch_kl_k1"] == pytest.approx(-sum(d) / 5, abs=1e-7)
    assert m["mismatch_kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5, rel=1e-4)
    assert all(v == 0.0 for v in mismatch_metrics(train, train, mask).values())
    assert all(v == 0.0 for v in mismatch_metrics(train, rollout, torch.zeros_like(mask)).values())
    with pytest.raises(ValueError, match="rollout_logp"):
        mismatch_metrics(train, rollout[:, :2], mask)
