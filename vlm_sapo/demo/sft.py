"""Cold start: a short supervised warm-up that teaches a fresh policy the answer format, and greedy accuracy per task.

RL learns only from groups whose rewards differ, so a random policy (which never closes an `<answer>` tag) gives it
nothing to work with. A few hundred supervised steps on gold completions make the policy follow the format and be
right some of the time; RL then has something to sharpen. The prompts are rendered exactly as the trainer renders them
(same processor, pixel budget, task instruction and grounding coordinate system) and the loss is the mean token
negative log-likelihood of the completion (`<|im_end|>` included), with the learner's own logprob code.

Plain torch (AdamW, one process), on purpose: the warm-up is a few hundred steps of a tiny model, and DeepSpeed's start-up
would cost more than the training.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_sapo.data import Sample, prompt_model_inputs
from vlm_sapo.models.logprobs import build_policy_inputs, token_logprobs
from vlm_sapo.tasks import coord_system_for_family, default_reward_specs, metric_key
from vlm_sapo.tasks.answers import answer_spread, parse_answers, warn_if_collapsed
from vlm_sapo.tasks.prompting import render_task_prompt

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One rendered prompt with its processor tensors and (for training) the target completion's token ids."""

    sample: Sample  # meta completed with coord_system, model_input_size and image_size, as the trainer does
    prompt: Any  # RenderedPrompt
    inputs: dict[str, torch.Tensor]
    target_ids: list[int] = field(default_factory=list)


def prepare_examples(processor: Any, samples: Sequence[Sample], *, family: str, min_pixels: int, max_pixels: int,
                     patch_size: int = 14, completion_for: Callable[[Sample], str] | None = None,
                     max_prompt_tokens: int | None = None) -> list[Example]:
    """Render every sample once; with `completion_for`, also tokenize its target completion plus `<|im_end|>`."""
    coords = coord_system_for_family(family)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for s in samples:
        rendered, s = render_task_prompt(processor, s, coord_system=coords, min_pixels=min_pixels,
                                         max_pixels=max_pixels, image_patch_size=patch_size,
                                         max_prompt_tokens=max_prompt_tokens)
        target = []
        if completion_for is not None:
            target = tok.encode(completion_for(s), add_special_tokens=False) + [end]
        out.append(Example(s, rendered, prompt_model_inputs(processor, rendered), target))
    return out


def nll_loss(model: Any, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (every token of the batch counts once)."""
    inputs = build_policy_inputs([e.inputs for e in batch], [e.target_ids for e in batch], pad_id)
    logp, _ = token_logprobs(model, inputs)
    mask = inputs["completion_mask"].float()
    return -(logp * mask).sum() / mask.sum()


@dataclass
class WarmupResult:
    steps: int
    seconds: float
    losses: list[float]  # one per step
    evals: list[dict[str, float]]  # {"step": ..., "<task>/accuracy": ...} at each evaluation


def supervised_warmup(model: Any, processor: Any, train: Sequence[Example], *, steps: int, batch_size: int = 32,
                      lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.0, seed: int = 0,
                      grad_clip: float = 1.0, eval_examples: Sequence[Example] = (), eval_every: int = 0,
                      max_new_tokens: int = 24) -> WarmupResult:
    """AdamW on the mean completion NLL for `steps` steps of `batch_size` examples drawn without replacement per
    epoch; optionally greedy accuracy on `eval_examples` every `eval_every` steps (and at the end)."""
    if not train or any(not e.target_ids for e in train):
        raise ValueError("supervised_warmup needs examples with target completions (prepare_examples(completion_for=))")
    pad_id = processor.tokenizer.pad_token_id
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(warmup_steps, 1)))
    order: list[int] = []
    losses, evals = [], []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        batch = [train[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = nll_loss(model, batch, pad_id)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"cold start: non-finite loss at step {step} (ids {[e.sample.id for e in batch]})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if eval_examples and ((eval_every and step % eval_every == 0) or step == steps):
            acc = greedy_accuracy(model, processor, eval_examples, max_new_tokens=max_new_tokens)
            evals.append({"step": float(step), **acc})
            log.info("cold start step %d: loss %.3f %s", step, loss.item(), acc)
            model.train()
    model.eval()
    return WarmupResult(steps, time.perf_counter() - t0, losses, evals)


def greedy_accuracy(model: Any, processor: Any, examples: Sequence[Example], *, max_new_tokens: int = 24,
                    details: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Greedy decoding, scored by each task's own reward (`generate_and_score`, the path validation and `vlm-sapo
    eval` take, in this process): `<task>/accuracy`, `<task>/format` (and `/iou`) means, and the spread of the parsed
    answers (`<task>/answers_distinct`, `<task>/answers_top_share`). Appends one record per example to `details` when
    given."""
    from vlm_sapo.eval.generate import generate_and_score
    from vlm_sapo.rollout import SamplingConfig
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine
    from vlm_sapo.scoring import InProcessScorer

    engine = HFRolloutEngine(model, processor, max_batch_prompts=64)
    scorer = InProcessScorer(default_reward_specs(sorted({e.sample.task for e in examples})))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    [scored] = generate_and_score(engine, [[(e.prompt, e.sample) for e in examples]], scorer, sampling=sampling)
    texts = [c.text for c in scored.rollouts.completions]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e, text, result in zip(examples, texts, scored.scores):
        scores = _own_scores(e.sample.task, result.scores, scorer.specs)
        counts[e.sample.task] = counts.get(e.sample.task, 0) + 1
        for key in ("accuracy", "format", "iou"):
            if key in scores:
                name = f"{e.sample.task}/{key}"
                sums[name] = sums.get(name, 0.0) + scores[key]
        if details is not None:
            details.append({"id": e.sample.id, "task": e.sample.task, "completion": text, "answer": e.sample.answer,
                            **scores})
    out = {k: v / counts[k.split("/")[0]] for k, v in sorted(sums.items())}
    for name in counts:
        spread = answer_spread(parse_answers(name, [t for e, t in zip(examples, texts) if e.sample.task == name]))
        warn_if_collapsed(spread, name, "greedy evaluation")
        out[f"{name}/answers_distinct"], out[f"{name}/answers_top_share"] = float(spread.distinct), spread.top_share
    return out


def _own_scores(task: str, scores: dict[str, float], specs: Sequence[Any]) -> dict[str, float]:
    """The task's own reward's scores, without their label (as `Task.reward` returns them)."""
    label = metric_key(task, specs).rpartition("/")[0]
    return {k[len(label) + 1:]: v for k, v in scores.items() if k.startswith(f"{label}/") and k != f"{label}/error"}
