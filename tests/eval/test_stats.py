"""pass@k against brute force, the Wilson interval against its definition, and the summaries built on them."""

from __future__ import annotations

import itertools
import math

import pytest

from vlm_sapo.eval.stats import k_values, pass_at_k, summarize, wilson_interval


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Every k-subset of n completions (c correct): the fraction holding at least one correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def _score_test_bound(x: int, n: int, upper: bool, z: float = 1.959963984540054) -> float:
    """The Wilson interval's end by its definition: the p at which |x/n - p| = z * sqrt(p(1-p)/n), by bisection."""
    phat = x / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(phat - mid) <= z * math.sqrt(mid * (1 - mid) / n)
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("x,n", [(8, 10), (0, 10), (10, 10), (1, 3), (57, 300)])
def test_wilson_interval_matches_its_definition(x, n):
    low, high = wilson_interval(x, n)
    assert low == pytest.approx(_score_test_bound(x, n, upper=False) if x else 0.0, abs=1e-9)
    assert high == pytest.approx(_score_test_bound(x, n, upper=True) if x < n else 1.0, abs=1e-9)


def test_wilson_known_case():
    # 8 of 10: the textbook Wilson 95% interval is (0.490, 0.943)
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)


def test_summarize_one_completion_uses_wilson():
    out = summarize([[1.0]] * 8 + [[0.0]] * 2)
    assert list(out) == ["pass@1"]
    assert out["pass@1"].value == pytest.approx(0.8)
    assert out["pass@1"].method == "wilson"
    assert (out["pass@1"].low, out["pass@1"].high) == pytest.approx(wilson_interval(8, 10))


def test_summarize_k_completions():
    groups = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0.0, 0.0, 1.0, 0.0]]
    out = summarize(groups)
    assert list(out) == ["pass@1", "pass@2", "pass@4", "avg@4"] and k_values(4) == [1, 2, 4]
    assert out["pass@1"].value == pytest.approx((2 / 4 + 0 + 1 + 1 / 4) / 4)
    assert out["pass@2"].value == pytest.approx(sum(brute_pass_at_k(4, c, 2) for c in (2, 0, 4, 1)) / 4)
    assert out["pass@4"].value == pytest.approx(3 / 4)
    assert out["avg@4"].value == pytest.approx(out["pass@1"].value)
    # Wilson over the 4 questions, the statistic as the proportion: for pass@4 = 3/4 exactly the 3-of-4 interval
    assert (out["pass@4"].low, out["pass@4"].high) == pytest.approx(wilson_interval(3, 4))
    assert all(e.method == "wilson" and e.low <= e.value <= e.high for e in out.values())


def test_small_groups_keep_wide_intervals():
    # one question answered right half the time: the interval must not collapse to a point
    out = summarize([[1.0, 0.0]])
    assert out["pass@1"].value == 0.5 and out["pass@1"].low < 0.2 and out["pass@1"].high > 0.8
    none = summarize([[0.0] * 4] * 10)
    assert none["pass@1"].value == 0.0 and none["pass@1"].high == pytest.approx(wilson_interval(0, 10)[1])
    assert math.isnan(summarize([])["pass@1"].value)
