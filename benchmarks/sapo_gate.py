"""SAPO's gate weight w and its gradient coefficient c = w r, against the importance ratio r.

    python benchmarks/sapo_gate.py            (prints the figures README and RESULTS.md quote)

SAPO's token gradient is w r A grad(log pi), w = 4 p (1 - p), p = sigmoid(tau (r - 1)). So w is relative to the raw
importance-weighted gradient r A grad(log pi), and c = w r is relative to the on-policy gradient A grad(log pi): c is
how much of a full on-policy step the token still takes. The extremes are found on a grid of step 1e-6 in r.
"""

from __future__ import annotations

import argparse

import numpy as np


def gate(r: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(w, c) at ratios r: w = 4 sigmoid(x) sigmoid(-x) with x = tau (r - 1), c = w r."""
    x = tau * (r - 1)
    w = 4 / ((1 + np.exp(-x)) * (1 + np.exp(x)))
    return w, w * r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", type=float, nargs="+", default=[1.0, 1.05])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 3.5, 5.0])
    args = parser.parse_args(argv)
    grid = np.arange(1.0, 10.0, 1e-6)
    for tau in args.taus:
        w, c = gate(np.asarray(args.ratios), tau)
        print(f"tau = {tau}: " + ", ".join(f"r {r:g}: w {wi:.3f} c {ci:.3f}" for r, wi, ci in zip(args.ratios, w, c)))
        _, cg = gate(grid, tau)
        peak = int(cg.argmax())
        below = peak + int(np.argmax(cg[peak:] < 1))
        print(f"  c peaks at {cg[peak]:.3f} (r = {grid[peak]:.3f}) and falls below 1 past r = {grid[below]:.3f}")


if __name__ == "__main__":
    main()
