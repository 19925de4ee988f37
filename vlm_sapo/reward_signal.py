"""What the advantage estimator sees: each completion's reward plus the overlong penalty, or its named components.

The reward pool scores every completion with `overall` (the weighted sum of the rewards that apply) and every named
score as `<label>/<key>` (`math/accuracy`, `math/format`, `grounding/iou`, ...). A scalar estimator (grpo, drgrpo,
rloo) gets `overall` + DAPO's overlong penalty (`algorithm.overlong.buffer`); an estimator over components (gdpo)
gets one column per `algorithm.advantage.components` entry, the overlong penalty being a column of its own
(`overlong`). Zero-variance filtering uses the same values, so a group is "flat" exactly when its advantages are 0.

Component names: `accuracy` matches the `accuracy` score of whichever reward gave one (it must be one reward per
sample: `math/accuracy` names it when two rewards both score `accuracy`); a sample without that score (its reward
failed, or a task mix where another task's reward has no such score) counts 0. A name no sample of the step has is
an error, so a misspelt component fails at the first step instead of silently adding nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlm_sapo.algos import overlong_penalty

OVERLONG = "overlong"


@dataclass
class RewardSignal:
    values: Tensor  # [P, G] (scalar estimators) or [P, G, C] (components)
    penalty: Tensor | None  # [P * G] overlong penalty (<= 0), None when shaping is off
    truncated: Tensor  # bool [P * G]: finish reason "length"

    def flat_groups(self) -> Tensor:
        """Bool [P]: every value (every component) of the group is the same, so its advantages are all 0."""
        v = self.values if self.values.dim() == 3 else self.values[..., None]
        return (v.amax(1) == v.amin(1)).all(-1)


def _score_of(scores: Mapping[str, float], name: str, sample_id: str) -> float | None:
    if "/" in name:
        return scores.get(name)
    hits = [k for k in scores if k.rpartition("/")[2] == name]
    if len(hits) > 1:
        raise ValueError(f"advantage component `{name}` matches {len(hits)} scores of sample {sample_id!r} "
                         f"({', '.join(sorted(hits))}): name one as `<label>/{name}` in algorithm.advantage.components")
    return scores[hits[0]] if hits else None


def component_scores(scores: Sequence[Any], sample_ids: Sequence[str], names: Sequence[str]) -> Tensor:
    """[N, C] float32: each completion's score of each named component (0 where the sample lacks it)."""
    out = torch.zeros(len(scores), len(names), dtype=torch.float32)
    for k, name in enumerate(names):
        found = False
        for i, (s, sid) in enumerate(zip(scores, sample_ids)):
            value = _score_of(s.scores, name, sid)
            if value is not None:
                out[i, k], found = float(value), True
        if not found and scores:
            known = sorted({key for s in scores for key in s.scores if not key.endswith("/error")})
            raise ValueError(f"advantage component `{name}` (algorithm.advantage.components) is not a score of any "
                             f"sample of this step; scores are: {', '.join(known)}")
    return out


def reward_signal(scores: Sequence[Any], completions: Sequence[Any], group_size: int, *,
                  components: Mapping[str, float] | None, overlong: Any, max_new_tokens: int) -> RewardSignal:
    """The estimator's input for prompt-major `completions` and their `ScoreResult`s (see the module docstring).

    `overlong` is the recipe's `algorithm.overlong` section (or None).
    """
    truncated = torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.bool)
    penalty = None
    if overlong is not None and overlong.buffer > 0:
        lengths = torch.tensor([len(c.completion_ids) for c in completions], dtype=torch.long)
        penalty = overlong_penalty(lengths, max_new_tokens, overlong.buffer, overlong.penalty_factor)
    if components:
        names = list(components)
        task = [n for n in names if n != OVERLONG]
        found = component_scores(scores, [c.sample_id for c in completions], task)
        if OVERLONG in names and penalty is None:
            raise ValueError("advantage component `overlong` needs algorithm.overlong.buffer > 0")
        columns = [penalty if n == OVERLONG else found[:, task.index(n)] for n in names]
        values = torch.stack(columns, dim=1) if columns else found
        return RewardSignal(values.view(-1, group_size, len(names)), penalty, truncated)
    overall = torch.tensor([s.overall for s in scores], dtype=torch.float32)
    if penalty is not None:
        overall = overall + penalty
    return RewardSignal(overall.view(-1, group_size), penalty, truncated)
