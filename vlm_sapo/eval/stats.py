"""Benchmark statistics: pass@k (unbiased), avg@K, and their 95% confidence intervals.

A question answered K times has c correct completions (metric >= 0.5; every built-in metric is 0 or 1).

- pass@k: Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1), the unbiased estimator
  1 - C(K-c, k) / C(K, k) per question, averaged over questions. pass@1 is then the fraction of correct completions.
- avg@K (K > 1): the mean metric value over all K completions of a question, averaged over questions (equal to pass@1
  for 0/1 metrics; differs for a continuous metric).

Confidence intervals, 95%: the Wilson score interval (Wilson 1927) over questions, with the statistic as the
proportion and the number of questions as n. With one completion per question pass@1 is a binomial proportion and
this is the usual Wilson interval (good coverage near 0% and 100%, unlike the normal approximation). With K > 1 each
question's value still lies in [0, 1], so its variance is at most p(1 - p): the same interval is conservative, and it
never collapses to zero width the way a bootstrap over a handful of questions (a small category) does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
CORRECT_AT = 0.5


@dataclass(frozen=True)
class Estimate:
    """A benchmark number with its 95% interval and how that interval was computed."""

    value: float
    low: float
    high: float
    method: str  # "wilson" | "none" (no questions)

    def as_dict(self) -> dict[str, float | str | None]:
        """JSON-ready: NaN (no questions) becomes None, so results.json stays strict JSON."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"value": num(self.value), "ci_low": num(self.low), "ci_high": num(self.high),
                "ci_method": self.method}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k for one question: n completions, c of them correct. Stable product form."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return (math.nan, math.nan)
    center, half = _wilson_center_half(successes / total, total, z)
    return (max(0.0, center - half), min(1.0, center + half))


def _wilson_center_half(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return center, half


def k_values(k: int) -> list[int]:
    """The pass@k columns reported for K completions per question: 1, the powers of two below K, and K."""
    ks, p = [1], 2
    while p < k:
        ks.append(p)
        p *= 2
    if k > 1:
        ks.append(k)
    return ks


def summarize(per_question: Sequence[Sequence[float]]) -> dict[str, Estimate]:
    """pass@k for `k_values(K)` and (K > 1) avg@K over questions, each with its 95% interval.

    K is the smallest number of completions any question has (a question with more still uses all of its own in the
    unbiased estimator). No questions: every value is NaN with method "none".
    """
    groups = [list(map(float, g)) for g in per_question]
    if any(not g for g in groups):
        raise ValueError("every question needs at least one scored completion")
    if not groups:
        nan = Estimate(math.nan, math.nan, math.nan, "none")
        return {"pass@1": nan}
    k = min(len(g) for g in groups)
    correct = [sum(v >= CORRECT_AT for v in g) for g in groups]
    out: dict[str, Estimate] = {}
    for kk in k_values(k):
        value = float(np.mean([pass_at_k(len(g), c, kk) for g, c in zip(groups, correct)]))
        out[f"pass@{kk}"] = _with_interval(value, len(groups))
    if k > 1:  # avg@1 would repeat pass@1 (every built-in metric is 0/1)
        out[f"avg@{k}"] = _with_interval(float(np.mean([np.mean(g) for g in groups])), len(groups))
    return out


def _with_interval(value: float, questions: int) -> Estimate:
    """`value` (a mean over questions of values in [0, 1]) with the Wilson interval over `questions`."""
    p = min(1.0, max(0.0, value))
    center, half = _wilson_center_half(p, questions)
    return Estimate(value, max(0.0, center - half), min(1.0, center + half), "wilson")
