"""The one evaluation path: generate with a rollout engine, score with the tasks' rewards.

`generate_and_score` is what `Trainer.validate` (the `data.val` rows), `evaluate` (`vlm-sapo eval` and the trainer's
`eval.benchmarks`) and the demo's before/after accuracy (`sft.greedy_accuracy`) all call. Each caller renders its own
prompts (all with `render_task_prompt`, so training, validation and evaluation prompts agree) and reads its own
numbers off the scores; the scorer is a `RewardPool` (isolated workers, time limits) or, for a few hundred samples of
the demo, an `InProcessScorer` (same scores, no worker start-up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from vlm_sapo.data import RenderedPrompt, Sample
from vlm_sapo.rollout import Rollouts, RolloutTiming, SamplingConfig
from vlm_sapo.scoring import RewardSpec, ScoreItem, ScoreResult


class Scorer(Protocol):
    """`RewardPool` and `InProcessScorer`: the rewards they run (`specs`) and `score`."""

    specs: list[RewardSpec]

    def score(self, items: Sequence[ScoreItem | tuple]) -> list[ScoreResult]: ...


@dataclasses.dataclass
class Scored:
    """One part's prompts with their samples, `n` completions each (prompt-major, as the engine returns them) and one
    score per completion."""

    prompts: list[RenderedPrompt]
    samples: list[Sample]
    rollouts: Rollouts
    scores: list[ScoreResult]

    def groups(self) -> list[tuple[Sample, RenderedPrompt, list[Any], list[ScoreResult]]]:
        """Per prompt: (sample, prompt, its completions, their scores)."""
        g = self.rollouts.group_size
        return [(s, p, self.rollouts.completions[k * g : (k + 1) * g], self.scores[k * g : (k + 1) * g])
                for k, (s, p) in enumerate(zip(self.samples, self.prompts))]


def generate_and_score(engine: Any, parts: Sequence[Sequence[tuple[RenderedPrompt, Sample]]], scorer: Scorer, *,
                       n: int = 1, sampling: SamplingConfig, batch_prompts: int | None = None,
                       progress: bool = False) -> list[Scored]:
    """`n` completions for every (prompt, sample) of every part, then each part scored in one call of `scorer`.

    All parts are generated together, `batch_prompts` prompts per `engine.generate` call (None: one call for all);
    with a sampling seed, each call's seed is offset by the index of its first completion, so chunks never repeat a
    stream. Parts are scored separately (a benchmark each), so a reward failing on a whole part fails only that part.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pairs = [pair for part in parts for pair in part]
    rollouts = _generate(engine, [p for p, _ in pairs], n, sampling, batch_prompts or max(len(pairs), 1), progress)
    out, start = [], 0
    for part in parts:
        prompts, samples = [p for p, _ in part], [s for _, s in part]
        own = rollouts if len(part) == len(pairs) else _slice(rollouts, start, len(part))
        start += len(part)
        items = [ScoreItem(samples[c.prompt_index].id, samples[c.prompt_index].task, c.text,
                           samples[c.prompt_index].answer, samples[c.prompt_index].meta) for c in own.completions]
        out.append(Scored(prompts, samples, own, scorer.score(items) if items else []))
    return out


def _generate(engine: Any, prompts: list[RenderedPrompt], n: int, sampling: SamplingConfig, batch_prompts: int,
              progress: bool) -> Rollouts:
    """One prompt-major `Rollouts` for all prompts, generated `batch_prompts` at a time under a progress bar."""
    from tqdm import tqdm

    chunks: list[Rollouts] = []
    with tqdm(total=len(prompts), desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_prompts):
            chunk = prompts[start : start + batch_prompts]
            # distinct seeds per chunk: the engines seed each call's prompts from `seed` + their index in the call
            chunk_sampling = (dataclasses.replace(sampling, seed=sampling.seed + start * n)
                              if sampling.seed is not None else sampling)
            chunks.append(engine.generate(chunk, n, chunk_sampling))
            bar.update(len(chunk))
    if len(chunks) == 1:
        return chunks[0]
    comps = [dataclasses.replace(c, prompt_index=k // n, sample_index=k % n)
             for k, c in enumerate(c for r in chunks for c in r.completions)]
    timing = RolloutTiming(sum(r.timing.seconds for r in chunks), sum(r.timing.prompt_tokens for r in chunks),
                           sum(r.timing.completion_tokens for r in chunks))
    engine_name = chunks[0].engine if chunks else getattr(engine, "name", type(engine).__name__)
    version = chunks[0].weight_version if chunks else 0
    return Rollouts(comps, n, timing, engine_name, version, sampling)


def _slice(rollouts: Rollouts, first_prompt: int, count: int) -> Rollouts:
    """Prompts `first_prompt ..` (`count` of them), renumbered from 0; the timing is the whole call's."""
    g = rollouts.group_size
    comps = [dataclasses.replace(c, prompt_index=c.prompt_index - first_prompt)
             for c in rollouts.completions[first_prompt * g : (first_prompt + count) * g]]
    return Rollouts(comps, g, rollouts.timing, rollouts.engine, rollouts.weight_version, rollouts.sampling)
