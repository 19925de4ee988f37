"""The off-policy regime of a loss call, read from the tensors the loss itself computed.

Why: an experiment that wants distributions (quantiles per advantage sign, per mini-batch) rather than the logged
means (`benchmarks/sapo_regime.py`) must not recompute them beside the loss, where they could drift from what the loss
did. The losses hand their tensors to the observers installed by ``observe_policy_losses``; nothing is computed when
none is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

LossObserver = Callable[[str, dict[str, Tensor]], None]
_OBSERVERS: list[LossObserver] = []


@contextlib.contextmanager
def observe_policy_losses(fn: LossObserver) -> Iterator[None]:
    """Call ``fn(loss_name, tensors)`` from every sapo/gspo/grpo/dapo/drgrpo call while the context is open.

    Why: an experiment that wants distributions (quantiles per advantage sign, per mini-batch) rather than the
    logged means reads them from the tensors the loss itself computed, so they cannot drift from what the loss did.
    ``tensors`` (detached, ``[batch, tokens]`` unless noted): ``log_ratio``, ``adv``, ``valid``, ``grad`` (a 0-dim
    bool: True inside the learner's backward passes, False on its whole-batch metrics call); clip losses add
    ``clipped_low``/``clipped_high``; GSPO adds ``seq_log_ratio`` ``[batch]``; SAPO adds ``gate_weight``, ``gate_coef``
    and ``tau``. ``regime_metrics`` turns them into floats. Nothing is computed when no observer is installed.
    """
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


def observing() -> bool:
    return bool(_OBSERVERS)


def notify(name: str, tensors: dict[str, Tensor]) -> None:
    """Called by the losses (only while ``observing()``) with the tensors described above."""
    for fn in list(_OBSERVERS):
        fn(name, tensors)


def _q(x: Tensor, qs: tuple[float, ...], prefix: str, out: dict[str, float]) -> None:
    """Quantiles (linear interpolation) and max of a 1-D tensor into ``out``; NaN when it is empty."""
    x = x.double()
    for q in qs:
        out[f"{prefix}_p{round(100 * q)}"] = float(torch.quantile(x, q)) if x.numel() else float("nan")
    out[f"{prefix}_max"] = float(x.max()) if x.numel() else float("nan")


def regime_metrics(name: str, t: dict[str, Tensor]) -> dict[str, float]:
    """Distributions of one loss call's off-policy regime, from ``observe_policy_losses`` tensors.

    Every loss: token ratio r quantiles (``ratio_p50|p99|max``), per-sequence Var_i = Var(log r) over valid tokens
    (``var_p50|p90|max``, the SAPO paper's quantity, for every loss alike). Clip losses: clipped fraction per advantage
    sign, as a fraction of that sign's units: GRPO/DAPO/Dr.GRPO tokens (``clip_frac_pos``: A > 0 tokens clipped high,
    ``clip_frac_neg``: A < 0 tokens clipped low), GSPO sequences (a sequence is clipped when its sequence ratio is).
    SAPO: quantiles of the gate weight w = 4p(1-p) and the coefficient c = w r per sign (``w_pos_p1|p50``,
    ``c_pos_p50|p99|max``, same for neg) and of the bound (tau_i^2/4) Var_i (``bound_p50|p90|max``). A sign with no
    unit gives NaN (not 0: an empty set has no quantile and no clip fraction).
    """
    valid, adv, lr = t["valid"], t["adv"], t["log_ratio"]
    out: dict[str, float] = {}
    _q(lr.exp()[valid], (0.5, 0.99), "ratio", out)
    lengths = valid.sum(-1)
    seqs = lengths > 0
    n = lengths.clamp(min=1)
    mean = lr.sum(-1, keepdim=True) / n[:, None]
    var = torch.where(valid, (lr - mean) ** 2, 0.0).sum(-1) / n
    _q(var[seqs], (0.5, 0.9), "var", out)
    pos, neg = valid & (adv > 0), valid & (adv < 0)
    if "clipped_low" in t:
        low, high = t["clipped_low"], t["clipped_high"]
        if "seq_log_ratio" in t:  # GSPO: one unit per sequence
            seq_adv = torch.where(valid, adv, 0.0).sum(-1) / n
            sp, sn = seqs & (seq_adv > 0), seqs & (seq_adv < 0)
            hit_high, hit_low = (high & valid).any(-1), (low & valid).any(-1)
            out["clip_frac_pos"] = float(hit_high[sp].double().mean()) if sp.any() else float("nan")
            out["clip_frac_neg"] = float(hit_low[sn].double().mean()) if sn.any() else float("nan")
        else:
            out["clip_frac_pos"] = float(high[pos].double().mean()) if pos.any() else float("nan")
            out["clip_frac_neg"] = float(low[neg].double().mean()) if neg.any() else float("nan")
    if "gate_weight" in t:
        w, c, tau = t["gate_weight"], t["gate_coef"], t["tau"]
        for sign, where in (("pos", pos), ("neg", neg)):
            _q(w[where], (0.01, 0.5), f"w_{sign}", out)
            _q(c[where], (0.5, 0.99), f"c_{sign}", out)
        seq_tau = torch.where(valid, tau, 0.0).amax(-1)
        _q((seq_tau**2 / 4 * var)[seqs], (0.5, 0.9), "bound", out)
    return out
