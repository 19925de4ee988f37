"""Policy losses against independent per-token references (plain Python loops over floats, written from the papers).

Each reference returns the loss value and the analytic gradient d loss / d logp[i][t], which the library's autograd
gradient must match. ``weights`` (per token, positive) lets the same references check truncated-IS weighting.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_sapo.algos import (
    aggregation_weight,
    get_policy_loss,
    list_policy_losses,
    policy_loss_aggregation,
    register_policy_loss,
)
from vlm_sapo.algos.kl import truncated_is_weight

LOSSES = ["sapo", "gspo", "grpo", "dapo", "drgrpo", "cispo", "dppo_tv", "dppo_kl"]
SPREAD = {"gspo": 2e-3}  # std of token log-ratios in test batches; GSPO's band (3e-4, 4e-4) is on a geometric mean


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _rows(logp, old, adv, mask, weights):
    """Per row: list of (t, logp, old_logp, advantage, weight) over valid tokens."""
    B, T = len(logp), len(logp[0])
    rows = []
    for i in range(B):
        a_row = adv[i] if isinstance(adv[i], list) else [adv[i]] * T
        w_row = weights[i] if weights is not None else [1.0] * T
        rows.append([(t, logp[i][t], old[i][t], a_row[t], w_row[t]) for t in range(T) if mask[i][t] > 0])
    return rows


def ref_sapo(logp, old, adv, mask, weights=None, tau_pos=1.0, tau_neg=1.05):
    rows = _rows(logp, old, adv, mask, weights)
    n_seq = sum(1 for r in rows if r)
    value, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    for i, toks in enumerate(rows):
        for t, lp, olp, a, w in toks:
            a = a * w
            r = math.exp(lp - olp)
            tau = tau_pos if a > 0 else tau_neg
            p = _sigmoid(tau * (r - 1))
            value += p * 4 / tau * a / len(toks)
            grad[i][t] = -(4 * p * (1 - p)) * r * a / (len(toks) * n_seq)
    return -value / max(n_seq, 1), grad


def _clip_token(r, a, lo, hi):
    """PPO per-token objective and its derivative w.r.t. log pi (r * a on the unclipped branch, else 0)."""
    objective = min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
    clipped = (a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo)
    return objective, 0.0 if clipped else r * a


def ref_clip(logp, old, adv, mask, weights=None, clip_low=0.2, clip_high=0.2, agg="seq", max_length=None):
    rows = _rows(logp, old, adv, mask, weights)
    n_seq = sum(1 for r in rows if r)
    n_tok = sum(len(r) for r in rows)
    value, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    for i, toks in enumerate(rows):
        for t, lp, olp, a, w in toks:
            obj, d = _clip_token(math.exp(lp - olp), a * w, clip_low, clip_high)
            if agg == "seq":  # token mean within the sequence, then mean over non-empty sequences
                denom = len(toks) * n_seq
            elif agg == "token":  # mean over every valid token of the batch
                denom = n_tok
            else:  # token sum over a constant, then mean over sequences
                denom = max_length * n_seq
            value += obj / denom
            grad[i][t] = -d / denom
    return -value, grad


def ref_gspo(logp, old, adv, mask, weights=None, clip_low=3e-4, clip_high=4e-4):
    rows = _rows(logp, old, adv, mask, weights)
    n_seq = sum(1 for r in rows if r)
    value, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    for i, toks in enumerate(rows):
        if not toks:
            continue
        s = math.exp(sum(lp - olp for _, lp, olp, _, _ in toks) / len(toks))
        for t, _, _, a, w in toks:
            obj, d = _clip_token(s, a * w, clip_low, clip_high)
            value += obj / (len(toks) * n_seq)
            grad[i][t] = -d / (len(toks) * n_seq)
    return -value, grad


def ref_cispo(logp, old, adv, mask, weights=None, clip_high=4.0, clip_low=None):
    rows = _rows(logp, old, adv, mask, weights)
    n_tok = sum(len(r) for r in rows)
    value, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    for i, toks in enumerate(rows):
        for t, lp, olp, a, w in toks:
            r = math.exp(lp - olp)
            c = min(max(r, 0.0 if clip_low is None else 1 - clip_low), 1 + clip_high)
            value += c * a * w * lp / n_tok
            grad[i][t] = -c * a * w / n_tok
    return -value, grad


def dppo_outside(lp, olp, divergence, lo=None, hi=None):
    """(moved up out of the region, moved down out of it) for one token, by the paper's binary TV or binary KL."""
    default = 0.15 if divergence == "tv" else 0.05
    lo, hi = default if lo is None else lo, default if hi is None else hi
    p, mu = math.exp(min(lp, 0.0)), math.exp(min(olp, 0.0))
    if divergence == "tv":
        return p - mu > hi, p - mu < -lo
    if mu == 1:
        kl = math.log(1 / p)
    else:  # p = 1 (a log-prob above 0 in the test batches is clamped to 0): an infinite divergence
        kl = mu * math.log(mu / p) + ((1 - mu) * math.log((1 - mu) / (1 - p)) if p < 1 else math.inf)
    return p > mu and kl > hi, p < mu and kl > lo


def ref_dppo(logp, old, adv, mask, weights=None, divergence="tv", clip_low=None, clip_high=None, ratio_cap=20.0):
    """DPPO (arXiv:2602.04879) from its definition: per token, keep = the update does not push the sampled token
    further out of the binary-TV / binary-KL trust region; loss -min(r, cap) A log pi over kept tokens, token mean."""
    rows = _rows(logp, old, adv, mask, weights)
    n_tok = sum(len(r) for r in rows)
    value, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    for i, toks in enumerate(rows):
        for t, lp, olp, a, w in toks:
            a = a * w
            out_up, out_down = dppo_outside(lp, olp, divergence, clip_low, clip_high)
            if (a > 0 and out_up) or (a < 0 and out_down):
                continue
            c = min(math.exp(lp - olp), ratio_cap)
            value += c * a * lp / n_tok
            grad[i][t] = -c * a / n_tok
    return -value, grad


REFERENCES = {
    "sapo": ref_sapo,
    "gspo": ref_gspo,
    "grpo": lambda *a, **k: ref_clip(*a, **k, agg="seq"),
    "dapo": lambda *a, **k: ref_clip(*a, clip_low=0.2, clip_high=0.28, **k, agg="token"),
    "drgrpo": lambda *a, **k: ref_clip(*a, **k, agg="const", max_length=1024),
    "cispo": ref_cispo,
    "dppo_tv": lambda *a, **k: ref_dppo(*a, **k, divergence="tv"),
    "dppo_kl": lambda *a, **k: ref_dppo(*a, **k, divergence="kl"),
}


def make_batch(seed: int, B: int = 5, T: int = 7, spread: float = 0.3, token_adv: bool = False, dtype=torch.float32):
    """Ragged mask (one empty row), log-ratios ~ N(0, spread), mixed-sign advantages."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    adv = (
        torch.randn(B, T, generator=g, dtype=torch.float64)
        if token_adv
        else torch.randn(B, generator=g, dtype=torch.float64)
    )
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def run(name, logp, old, adv, mask, **hp):
    x = logp.clone().requires_grad_(True)
    loss, metrics = get_policy_loss(name)(x, old, adv, mask, **hp)
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_registry_names_and_signatures():
    assert list_policy_losses() == sorted(LOSSES)
    for name in LOSSES:
        params = list(inspect.signature(get_policy_loss(name)).parameters.values())
        assert [p.name for p in params[:4]] == ["logp", "old_logp", "advantages", "mask"]
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[4:])
        assert get_policy_loss(name).__doc__ and "arXiv:" in get_policy_loss(name).__doc__
    with pytest.raises(ValueError, match="sapo"):  # the error lists the valid names
        get_policy_loss("ppo2")
    with pytest.raises(TypeError, match="keyword-only"):
        register_policy_loss("bad", aggregation="token-mean")(lambda logp, old_logp, advantages, mask, eps: None)


def test_default_hparams_match_the_papers():
    defaults = {
        n: {
            k: p.default
            for k, p in inspect.signature(get_policy_loss(n)).parameters.items()
            if p.kind is p.KEYWORD_ONLY
        }
        for n in LOSSES
    }
    assert defaults["sapo"]["tau_pos"] == 1.0 and defaults["sapo"]["tau_neg"] == 1.05
    assert (defaults["gspo"]["clip_low"], defaults["gspo"]["clip_high"]) == (3e-4, 4e-4)
    assert (defaults["grpo"]["clip_low"], defaults["grpo"]["clip_high"]) == (0.2, 0.2)
    assert (defaults["dapo"]["clip_low"], defaults["dapo"]["clip_high"]) == (0.2, 0.28)
    assert defaults["cispo"]["clip_low"] is None
    assert (defaults["dppo_tv"]["clip_low"], defaults["dppo_tv"]["clip_high"]) == (0.15, 0.15)
    assert (defaults["dppo_kl"]["clip_low"], defaults["dppo_kl"]["clip_high"]) == (0.05, 0.05)
    assert defaults["dppo_tv"]["ratio_cap"] == defaults["dppo_kl"]["ratio_cap"] == 20.0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_match_reference(name, token_adv, dtype):
    for seed in range(5):
        logp, old, adv, mask = make_batch(seed, spread=SPREAD.get(name, 0.3), token_adv=token_adv, dtype=dtype)
        loss, grad, _ = run(name, logp, old, adv, mask)
        ref_value, ref_grad = REFERENCES[name](logp.tolist(), old.tolist(), adv.tolist(), mask.tolist())
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        assert loss.item() == pytest.approx(ref_value, rel=tol["rtol"], abs=tol["atol"])
        torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=dtype), **tol)


def test_reference_batches_exercise_both_clip_sides():
    seen = {n: [0.0, 0.0] for n in ["gspo", "grpo", "dapo", "drgrpo", "dppo_tv", "dppo_kl"]}
    for name in seen:
        for seed in range(5):
            logp, old, adv, mask = make_batch(seed, spread=SPREAD.get(name, 0.3), token_adv=True)
            _, _, m = run(name, logp, old, adv, mask)
            seen[name][0] += m["clip_frac_low"]
            seen[name][1] += m["clip_frac_high"]
    assert all(lo > 0 and hi > 0 for lo, hi in seen.values()), seen


@pytest.mark.parametrize("name", LOSSES)
def test_clip_fractions_and_ratio_metrics(name):
    logp, old, adv, mask = make_batch(7, spread=SPREAD.get(name, 0.5), token_adv=True)
    _, _, m = run(name, logp, old, adv, mask)
    lo, hi = {"gspo": (3e-4, 4e-4), "dapo": (0.2, 0.28), "cispo": (None, 4.0)}.get(name, (0.2, 0.2))
    low = high = n = 0
    ratios = []
    for i in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        seq = math.exp(sum(float(logp[i, t] - old[i, t]) for t in toks) / len(toks))
        ratios += [seq] if name == "gspo" else []
        for t in toks:
            r = seq if name == "gspo" else math.exp(float(logp[i, t] - old[i, t]))
            ratios += [] if name == "gspo" else [r]
            a = float(adv[i, t])
            if name.startswith("dppo"):
                up, down = dppo_outside(float(logp[i, t]), float(old[i, t]), name.removeprefix("dppo_"))
                low += a < 0 and down
                high += a > 0 and up
            elif name == "cispo":
                high += r > 1 + hi
            else:
                low += a < 0 and r < 1 - lo
                high += a > 0 and r > 1 + hi
            n += 1
    if name != "sapo":
        assert m["clip_frac_low"] == pytest.approx(low / n)
        assert m["clip_frac_high"] == pytest.approx(high / n)
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(max(ratios), rel=1e-5)


def test_aggregation_modes_on_a_ragged_mask_by_hand():
    # on-policy (r = 1): the clip objective per token is A. Row 0 has 1 valid token (A=1), row 1 has 3 (A=2, 4, 6).
    adv = torch.tensor([[1.0, 9.0, 9.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.full((2, 3), -0.5)
    loss = {
        n: get_policy_loss(n)(logp, logp, adv, mask, **hp)[0].item()
        for n, hp in [("grpo", {}), ("dapo", {}), ("drgrpo", {"max_length": 4}), ("sapo", {}), ("cispo", {})]
    }
    assert loss["grpo"] == pytest.approx(-(1 + (2 + 4 + 6) / 3) / 2)  # -2.5: token mean, then sequence mean
    assert loss["dapo"] == pytest.approx(-(1 + 2 + 4 + 6) / 4)  # -3.25: token mean over the batch
    assert loss["drgrpo"] == pytest.approx(-(1 / 4 + 12 / 4) / 2)  # -1.625: token sum / 4, then sequence mean
    assert loss["sapo"] == pytest.approx(-2 * (1 + 4) / 2)  # f(1) = sigmoid(0) * 4 / tau = 2 (tau_pos = 1, A > 0)
    assert loss["cispo"] == pytest.approx(-(1 + 2 + 4 + 6) * -0.5 / 4)  # weight 1 on-policy, times log pi


def test_sapo_gate_is_the_sigmoid_formula():
    # one token per sequence: loss = -(1/B) sum_i f(r_i) A_i with f(r) = sigmoid(tau (r - 1)) * 4 / tau
    r = torch.tensor([0.5, 0.9, 1.0, 1.3, 2.0, 3.0], dtype=torch.float64)  # float64: test the formula, not rounding
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 1.5, -2.0], dtype=torch.float64)
    old = torch.full((6, 1), -1.0, dtype=torch.float64)
    logp = old + r.log()[:, None]
    for tau_pos, tau_neg in [(1.0, 1.05), (0.5, 2.0)]:
        loss, _ = get_policy_loss("sapo")(logp, old, adv, torch.ones(6, 1), tau_pos=tau_pos, tau_neg=tau_neg)
        expected = 0.0
        for ri, ai in zip(r.tolist(), adv.tolist()):
            tau = tau_pos if ai > 0 else tau_neg
            expected += 1 / (1 + math.exp(-tau * (ri - 1))) * 4 / tau * ai
        assert loss.item() == pytest.approx(-expected / 6, rel=1e-12)


def test_sapo_gradient_is_plain_policy_gradient_on_policy():
    logp, _, adv, mask = make_batch(3, token_adv=True)
    _, grad, m = run("sapo", logp, logp, adv, mask)
    n = mask.sum(-1, keepdim=True)
    B = int((n > 0).sum())
    plain = torch.where(mask > 0, -adv / (n.clamp(min=1) * B), 0.0)  # REINFORCE with seq-mean-token-mean
    torch.testing.assert_close(grad, plain)
    assert m["gate_weight_mean"] == pytest.approx(1.0) and m["log_ratio_var_max"] == 0.0


def test_sapo_decays_negative_advantages_faster():
    ratios = torch.tensor([0.3, 0.7, 0.95, 1.05, 1.5, 3.0])
    logp = ratios.log()[None, :].repeat(2, 1)
    old = torch.zeros(2, 6)
    adv = torch.tensor([1.0, -1.0])
    _, grad, _ = run("sapo", logp, old, adv, torch.ones(2, 6))
    pos, neg = grad[0].abs(), grad[1].abs()
    assert torch.all(neg < pos), (pos, neg)  # tau_neg = 1.05 > tau_pos = 1: smaller weight away from r = 1
    _, grad_sym, _ = run("sapo", logp, old, adv, torch.ones(2, 6), tau_neg=1.0)
    torch.testing.assert_close(grad_sym[0].abs(), grad_sym[1].abs())
    # the weight itself: w = 4 p (1 - p) = sech^2(tau (r - 1) / 2), and |grad| = w r |A| / (|o_i| B)
    for tau, row in [(1.0, pos), (1.05, neg)]:
        w = 1 / torch.cosh(tau * (ratios.double() - 1) / 2) ** 2
        torch.testing.assert_close(row.double(), w * ratios.double() / (6 * 2), rtol=1e-5, atol=0)


def test_sapo_metrics_match_definitions():
    logp, old, adv, mask = make_batch(11, spread=0.8, token_adv=False)
    _, _, m = run("sapo", logp, old, adv, mask)
    weights, variances, bounds = [], [], []
    for i in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        z = [float(logp[i, t] - old[i, t]) for t in toks]
        tau = 1.0 if adv[i] > 0 else 1.05
        weights += [4 * _sigmoid(tau * (math.exp(zt) - 1)) * (1 - _sigmoid(tau * (math.exp(zt) - 1))) for zt in z]
        mu = sum(z) / len(z)
        variances.append(sum((zt - mu) ** 2 for zt in z) / len(z))
        bounds.append(tau**2 / 4 * variances[-1])
    assert m["gate_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert m["gate_weight_lt_half_frac"] == pytest.approx(sum(w < 0.5 for w in weights) / len(weights))
    assert 0 < m["gate_weight_lt_half_frac"] < 1
    assert m["log_ratio_var_mean"] == pytest.approx(sum(variances) / len(variances), rel=1e-5)
    assert m["log_ratio_var_max"] == pytest.approx(max(variances), rel=1e-5)
    assert m["gate_bound_mean"] == pytest.approx(sum(bounds) / len(bounds), rel=1e-5)


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's and torch's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def test_sapo_gate_coefficient_per_advantage_sign():
    """c = w r per token, by the sign of its advantage: mean, p50, p99 against a hand computation; 0 for a sign
    no token has; and the figures README quotes (tau 1: c(3.5) = 0.98, c peaks at 1.57 near r = 2.06)."""
    logp, old, adv, mask = make_batch(5, spread=0.8, token_adv=True)
    adv[0, :2] = 0.0  # zero-advantage tokens belong to neither sign
    _, _, m = run("sapo", logp, old, adv, mask)
    coefs = {"pos": [], "neg": []}
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] == 0 or adv[i, t] == 0:
                continue
            r = math.exp(float(logp[i, t] - old[i, t]))
            tau = 1.0 if adv[i, t] > 0 else 1.05
            p = _sigmoid(tau * (r - 1))
            coefs["pos" if adv[i, t] > 0 else "neg"].append(4 * p * (1 - p) * r)
    for sign, c in coefs.items():
        assert len(c) >= 5
        assert m[f"gate_coef_{sign}_mean"] == pytest.approx(sum(c) / len(c), rel=1e-5)
        assert m[f"gate_coef_{sign}_p50"] == pytest.approx(_quantile(c, 0.5), rel=1e-5)
        assert m[f"gate_coef_{sign}_p99"] == pytest.approx(_quantile(c, 0.99), rel=1e-5)
    _, _, only_pos = run("sapo", logp, old, adv.abs() + 0.1, mask)
    assert only_pos["gate_coef_neg_mean"] == only_pos["gate_coef_neg_p99"] == 0.0
    ratios = torch.tensor([[3.5, 2.06]])
    _, _, at = run("sapo", ratios.log(), torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
                   tau_pos=1.0)
    assert at["gate_coef_pos_mean"] == pytest.approx(0.98, abs=0.005)
    _, _, peak = run("sapo", ratios.log(), torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]),
                     tau_pos=1.0)
    assert peak["gate_coef_pos_mean"] == pytest.approx(1.57, abs=0.005)


@pytest.mark.parametrize("name", LOSSES)
def test_finite_at_extreme_ratios_and_empty_rows(name):
    B, T = 4, 5
    old = torch.full((B, T), -2.0)
    logp = old + torch.tensor([1e3, -1e3, 25.0, -25.0, 0.1])[None, :]
    adv = torch.tensor([1.0, -1.0, 2.0, -3.0])
    mask = torch.ones(B, T)
    mask[3] = 0
    loss, grad, metrics = run(name, logp, old, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert torch.all(grad[3] == 0)
    loss, grad, metrics = run(name, logp, old, adv, torch.zeros(B, T))  # nothing valid at all
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(v == 0.0 for v in metrics.values()), metrics


@pytest.mark.parametrize("name", LOSSES)
def test_micro_batches_weighted_by_aggregation_weight_equal_the_full_batch(name):
    logp, old, adv, mask = make_batch(5, B=6, spread=SPREAD.get(name, 0.3), token_adv=True)
    full, full_grad, _ = run(name, logp, old, adv, mask)
    mode = policy_loss_aggregation(name)
    parts = [slice(0, 2), slice(2, 6)]
    total = sum(aggregation_weight(mode, mask[s]) for s in parts)
    x = logp.clone().requires_grad_(True)
    combined = sum(
        get_policy_loss(name)(x[s], old[s], adv[s], mask[s])[0] * aggregation_weight(mode, mask[s]) / total
        for s in parts
    )
    combined.backward()
    assert combined.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(x.grad, full_grad)


@pytest.mark.parametrize("name", LOSSES)
def test_truncated_is_weight_applied_through_advantages_weights_each_token(name):
    logp, old, adv, mask = make_batch(9, spread=SPREAD.get(name, 0.3), token_adv=True)
    rollout = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    w = truncated_is_weight(old, rollout, cap=2.0)
    assert 0 < w.min() and w.max() == 2.0 and w.min() < 1  # the cap binds somewhere, and some weights are < 1
    loss, grad, _ = run(name, logp, old, adv * w, mask)
    ref_value, ref_grad = REFERENCES[name](logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), weights=w.tolist())
    assert loss.item() == pytest.approx(ref_value, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=grad.dtype), rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_argument():
    logp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match="old_logp"):
        get_policy_loss("sapo")(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        get_policy_loss("grpo")(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        get_policy_loss("dapo")(logp, old, adv, mask[:2])
    with pytest.raises(ValueError, match="max_length"):
        get_policy_loss("drgrpo")(logp, old, adv, mask, max_length=2)
    with pytest.raises(ValueError, match="tau"):
        get_policy_loss("sapo")(logp, old, adv, mask, tau_neg=0.0)


# ---- properties --------------------------------------------------------------------------------------------------

garbage = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def batches(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4 - 0.01
    logp = old + torch.randn(B, T, generator=g) * draw(st.sampled_from([1e-4, 0.05, 0.5, 3.0]))
    mask = (torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))).float()
    adv = torch.randn(B, T, generator=g) if draw(st.booleans()) else torch.randn(B, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=40, deadline=None)
@given(batch=batches(), data=st.data())
def test_masked_positions_change_nothing(name, batch, data):
    logp, old, adv, mask = batch
    hidden = mask == 0
    n = int(hidden.sum())
    junk_logp = logp.clone()
    junk_old = old.clone()
    junk_logp[hidden] = torch.tensor(data.draw(st.lists(garbage, min_size=n, max_size=n)), dtype=torch.float32)
    junk_old[hidden] = torch.tensor(data.draw(st.lists(garbage, min_size=n, max_size=n)), dtype=torch.float32)
    junk_adv = adv.clone()
    if adv.dim() == 2:
        junk_adv[hidden] = torch.tensor(data.draw(st.lists(garbage, min_size=n, max_size=n)), dtype=torch.float32)
    hp = {"max_length": 8} if name == "drgrpo" else {}
    loss, grad, metrics = run(name, logp, old, adv, mask, **hp)
    loss2, grad2, metrics2 = run(name, junk_logp, junk_old, junk_adv, mask, **hp)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and metrics == metrics2
    assert torch.all(grad[hidden] == 0)


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=40, deadline=None)
@given(batch=batches(), seed=st.integers(0, 1000))
def test_permuting_sequences_changes_nothing(name, batch, seed):
    logp, old, adv, mask = batch
    perm = torch.randperm(logp.shape[0], generator=torch.Generator().manual_seed(seed))
    hp = {"max_length": 8} if name == "drgrpo" else {}
    loss, grad, metrics = run(name, logp, old, adv, mask, **hp)
    loss_p, grad_p, metrics_p = run(name, logp[perm], old[perm], adv[perm], mask[perm], **hp)
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-5, atol=1e-7)
    assert metrics_p == pytest.approx(metrics, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_masks_by_divergence_not_by_ratio(name):
    """The paper's point, one token per case (A = +1 or -1, float64), against a hand computation:
    a rare token moving 1e-4 -> 1e-3 (ratio 10) stays in the region (PPO's clip drops it); a common token moving
    0.5 -> 0.7 (ratio 1.4) leaves it; a move back towards the region is never dropped; the weight is capped at 20."""
    old_p = [1e-4, 0.5, 0.5, 0.9, 0.5, 1e-5]
    new_p = [1e-3, 0.7, 0.6, 0.7, 0.8, 1e-3]
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    kept = [True, False, True, False, True, True]  # TV: |delta| 9e-4, 0.2, 0.1, 0.2; KL: 0.087, 0.020, 0.116
    old = torch.tensor(old_p, dtype=torch.float64).log()[:, None]
    logp = torch.tensor(new_p, dtype=torch.float64).log()[:, None]
    mask = torch.ones(6, 1)
    loss, grad, m = run(name, logp, old, adv, mask)
    weights = [min(p / q, 20.0) for p, q in zip(new_p, old_p)]
    expected = [-w * a / 6 if k else 0.0 for w, a, k in zip(weights, adv.tolist(), kept)]
    torch.testing.assert_close(grad[:, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    value = -sum(w * a * lp / 6 for w, a, lp, k in zip(weights, adv.tolist(), logp[:, 0].tolist(), kept) if k)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert m["clip_frac_high"] == pytest.approx(1 / 6) and m["clip_frac_low"] == pytest.approx(1 / 6)
    assert m["ratio_capped_frac"] == pytest.approx(1 / 6)
    _, grpo_grad, _ = run("grpo", logp, old, adv, mask)
    assert grpo_grad[0, 0] == 0 and grad[0, 0] < 0  # PPO's ratio clip drops the rare token DPPO keeps
