"""`algorithm.zero_variance_groups: resample` (DAPO's dynamic sampling) in the real trainer, in-process: one
`train_step` on a tiny Qwen2.5-VL with the transformers engine, under a reward that is flat (0 for every completion)
on the Geometry3K rows whose answer is not D and spread out on the others. Recorded from the trainer's own calls:
each round of rollouts, the batch the step kept, and what reached the learner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_sapo.algos import zero_variance_groups
from vlm_sapo.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smoke_cpu.yaml"
REWARD = '''
def compute_score(completion, ground_truth, **meta):
    """0 for every completion of a row whose answer is not D (a zero-variance group); otherwise a score that differs
    between completions."""
    if ground_truth != "D":
        return {"overall": 0.0}
    return {"overall": (sum(map(ord, completion)) % 97) / 97}
'''
G, PROMPTS, MAX_ROUNDS = 4, 4, 2


def test_resample_keeps_only_groups_with_reward_variance(tiny_qwen25_dir: Path, tmp_path: Path) -> None:
    from vlm_sapo.trainer import Trainer

    reward = tmp_path / "flat_unless_d.py"
    reward.write_text(REWARD)
    recipe = load_recipe(RECIPE, [
        f"model.path={tiny_qwen25_dir}", f"logging.dir={tmp_path / 'run'}", f"rollout.n={G}",
        "rollout.max_new_tokens=6", f"data.prompts_per_step={PROMPTS}", "algorithm.mini_batches=2",
        "algorithm.zero_variance_groups=resample", f"algorithm.max_resample_rounds={MAX_ROUNDS}",
        f"rewards.functions=[{{name: '{reward}:compute_score'}}]", "rewards.workers=1",
        "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=0",
        "checkpoint.resume=never", "learner.steps=1"])
    trainer = Trainer(recipe)
    rounds, kept, updates = [], [], []
    rollout_and_score, collect, update = trainer._rollout_and_score, trainer._collect, trainer.learner.update

    def record_round(*args, **kwargs):
        rounds.append(rollout_and_score(*args, **kwargs))
        return rounds[-1]

    def record_collect(timer):
        out = collect(timer)
        kept.append(out[0])
        return out

    def record_update(batch, objective):
        updates.append(batch)
        return update(batch, objective)

    trainer._rollout_and_score, trainer._collect, trainer.learner.update = record_round, record_collect, record_update
    try:
        metrics, batch_ids = trainer.train_step()
    finally:
        trainer.close()

    flat = [zero_variance_groups(r.rewards, G) for r in rounds]
    answers = [[s.answer for s in r.samples] for r in rounds]
    # the reward does what it says: a group is flat exactly when its row's answer is not D
    assert [f.tolist() for f in flat] == [[a != "D" for a in ans] for ans in answers]
    assert flat[0].any(), "the first round must hold a flat group for this test to check resampling"
    # each round asks for the prompts still missing; rounds stop once enough groups are kept or after MAX_ROUNDS more
    kept_per_round = [int((~f).sum()) for f in flat]
    before = [sum(kept_per_round[:i]) for i in range(len(rounds))]
    assert [len(r.prompts) for r in rounds] == [PROMPTS - b for b in before]
    assert all(b < PROMPTS for b in before)
    assert sum(kept_per_round) >= PROMPTS or len(rounds) == MAX_ROUNDS + 1
    assert len(rounds) >= 2
    assert metrics["batch/resample_rounds"] == len(rounds) - 1
    assert metrics["batch/groups_kept"] == sum(kept_per_round)
    assert metrics["batch/zero_variance_frac"] == pytest.approx(float(flat[0].float().mean()))
    assert batch_ids == [s.id for r in rounds for s in r.samples]

    # the step's batch: the groups with variance from every round, in order, and no flat group
    (batch,) = kept
    assert [s.id for s in batch.samples] == [s.id for r, f in zip(rounds, flat) for s, x in zip(r.samples, f) if not x]
    assert not zero_variance_groups(batch.rewards, G).any()
    # ... and it is what reached the learner: its G completions per kept prompt, split over the two mini-batches,
    # each with a completion to score, carrying every advantage of the step
    assert len(updates) == 2 and metrics["train/skipped_updates"] == 0
    assert sum(u.inputs["input_ids"].shape[0] for u in updates) == G * len(batch.samples)
    assert all(bool(u.inputs["completion_mask"].any(dim=1).all()) for u in updates)
    adv = torch.cat([u.advantages for u in updates])
    assert adv.numel() == G * len(batch.samples) and float(adv.abs().sum()) > 0
    assert float(adv.abs().mean()) == pytest.approx(metrics["batch/advantage_abs_mean"], rel=1e-6)
