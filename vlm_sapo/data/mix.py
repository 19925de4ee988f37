"""Deterministic, resumable prompt batches over several data sources mixed by ratio.

The SAPO paper's Qwen3-VL run mixed tasks within every batch; smooth weighted round-robin gives each source its exact
share of every batch (no sampling noise in small batches), and each source walks its own seeded permutation, epoch after
epoch. The whole position is three short lists, saved in checkpoints so a resumed run continues the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class TaskMixSampler:
    sizes: list[int]
    weights: list[float]
    seed: int = 0
    shuffle: bool = True
    epochs: list[int] = field(default_factory=list)
    cursors: list[int] = field(default_factory=list)
    credit: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.weights):
            raise ValueError("one size and one weight per data source")
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"every data source needs at least one usable row (sizes: {self.sizes})")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"weights must be positive, got {self.weights}")
        n = len(self.sizes)
        self.epochs = self.epochs or [0] * n
        self.cursors = self.cursors or [0] * n
        self.credit = self.credit or [0.0] * n
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._orders:
            order = list(range(self.sizes[source]))
            if self.shuffle:
                random.Random(f"{self.seed}/{source}/{epoch}").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # keep one epoch per source
            self._orders[key] = order
        return self._orders[key]

    def _next_source(self) -> int:
        total = sum(self.weights)
        for i, w in enumerate(self.weights):
            self.credit[i] += w / total
        best = max(range(len(self.weights)), key=lambda i: (self.credit[i], -i))
        self.credit[best] -= 1.0
        return best

    def next_batch(self, batch_size: int) -> list[tuple[int, int]]:
        """``batch_size`` pairs (source index, row index within that source)."""
        out = []
        for _ in range(batch_size):
            s = self._next_source()
            out.append((s, self._order(s, self.epochs[s])[self.cursors[s]]))
            self.cursors[s] += 1
            if self.cursors[s] == self.sizes[s]:
                self.cursors[s], self.epochs[s] = 0, self.epochs[s] + 1
        return out

    def state_dict(self) -> dict:
        return {"epochs": list(self.epochs), "cursors": list(self.cursors), "credit": list(self.credit)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["epochs"]) != len(self.sizes):
            raise ValueError("the checkpoint's data position has a different number of sources than the recipe")
        self.epochs, self.cursors = list(state["epochs"]), list(state["cursors"])
        self.credit = [float(c) for c in state["credit"]]
