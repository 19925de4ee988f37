"""`generate_and_score`, the one evaluation path, with a fake engine: chunking, per-part scoring, seeds; and the
in-process scorer giving what the reward pool gives."""

from __future__ import annotations

import torch

from vlm_sapo.data import RenderedPrompt, Sample
from vlm_sapo.eval import generate_and_score
from vlm_sapo.rollout import Completion, Rollouts, RolloutTiming, SamplingConfig
from vlm_sapo.scoring import InProcessScorer
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import default_reward_specs


class EchoEngine:
    """Answers each prompt's sample id (the prompt text) as the k-th completion; records each call's seed."""

    name = "echo"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), sampling.seed))
        comps = [Completion(i, k, p.id, [1], [2], torch.zeros(1), "stop", f"<think>x</think><answer>{p.text}</answer>",
                            0.0) for i, p in enumerate(prompts) for k in range(n)]
        return Rollouts(comps, n, RolloutTiming(1.0, len(prompts), len(comps)), self.name)


def _pair(sid: str, answer: str, task: str = "math") -> tuple[RenderedPrompt, Sample]:
    return RenderedPrompt(sid, answer if sid != "wrong" else "7", [], [], 3), Sample(sid, task, [], "q", answer, {})


def test_parts_are_generated_in_chunks_and_scored_separately():
    engine = EchoEngine()
    parts = [[_pair("a", "1"), _pair("wrong", "2"), _pair("b", "3")], [], [_pair("c", "4")]]
    with RewardPool(default_reward_specs(["math"]), workers=1) as pool:
        out = generate_and_score(engine, parts, pool, n=2, sampling=SamplingConfig(temperature=1.0, seed=5),
                                 batch_prompts=2)
    assert engine.calls == [(2, 5), (2, 9)]  # the second chunk's seed starts past the first chunk's 4 completions
    assert [len(p.rollouts) for p in out] == [6, 0, 2] and [len(p.scores) for p in out] == [6, 0, 2]
    assert [[c.prompt_index for c in p.rollouts.completions] for p in out] == [[0, 0, 1, 1, 2, 2], [], [0, 0]]
    assert [s.scores["math/accuracy"] for s in out[0].scores] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    (sample, prompt, comps, scores), = out[2].groups()
    assert sample.id == "c" and prompt.id == "c" and len(comps) == len(scores) == 2


def test_in_process_scorer_scores_as_the_pool_does():
    box = (RenderedPrompt("g", "[0, 0, 10, 10]", [], [], 3),
           Sample("g", "grounding", [], "q", [0, 0, 10, 20], {"coord_system": "abs_original", "image_size": (50, 50)}))
    pairs = [_pair("a", "1"), _pair("wrong", "2"), box]
    specs = default_reward_specs(["math", "grounding"])
    with RewardPool(specs, workers=1) as pool:
        [pooled] = generate_and_score(EchoEngine(), [pairs], pool, sampling=SamplingConfig(temperature=0.0))
    [inline] = generate_and_score(EchoEngine(), [pairs], InProcessScorer(specs), sampling=SamplingConfig(temperature=0.0))
    assert inline.scores == pooled.scores
    assert inline.scores[2].scores["grounding/iou"] == 0.5 and inline.scores[1].overall == pooled.scores[1].overall
