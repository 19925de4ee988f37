"""The RL loop: `vlm-sapo train RECIPE`.

One step: take a batch of prompts (each task its share), roll out G completions per prompt, score them in the reward
pool, compute group advantages, drop or resample groups whose rewards are all equal, compute old logprobs for every
mini-batch with the learner before its first update (skipped on-policy, see below), make K updates (the paper's
off-policy setting), push the new weights into the rollout engine, log, checkpoint.

What it simplifies, on purpose:
- Data parallel ranks each take their own slice of the step's prompts (and all G samples of each), so group statistics
  never cross ranks; logged reward metrics are rank 0's slice.
- Old logprobs are recomputed by the learner (exact for any number of mini-batches), except on-policy (K = 1 and no
  truncated importance sampling): there pi_old is the current policy, and the update uses the detached logprobs of
  its own forward (`UpdateBatch(old_logp=None)`), saving a no-grad pass over the batch. The rollout engine's own
  logprobs feed the train/rollout mismatch metrics and the optional truncated importance-sampling correction.
- The transformers rollout backend generates with the learner's own module under ZeRO-1/2 (no copy, no sync); under
  ZeRO-3 and with vLLM the engine holds its own weights and gets the learner's after every step.

Faults (tests/reliability proves each one):
- A dead rollout engine (`RolloutEngineError`) abandons the step in progress, which has written nothing.
  `rollout.on_engine_death: fail` stops with the engine's error and the resume point; `restart` re-executes this process
  as `python -m vlm_sapo.cli train <run>/recipe.yaml --resume` (in-process rebuilding is not possible: vLLM's shutdown
  destroys torch's default process group, which the learner uses), at most `MAX_ENGINE_RESTARTS` times before a step
  past the last death completes. Under a launcher (torchrun) `restart` stops instead: use the launcher's restarts.
- A checkpoint that cannot be written (disk full, permissions) stops the run: the previous checkpoint stays the resume
  point, and the step is not logged, so metrics.jsonl never runs ahead of what can be resumed.
- A checkpoint carries a copy of its step's metrics line, restored on resume if the run died before logging it, so
  metrics.jsonl neither misses nor repeats a step.
- `VLM_SAPO_FAULT` (tests only) injects faults (kills at named points, NaN advantages, a dead vLLM engine) through
  the named fault points of `vlm_sapo.faults`, which do nothing unless it is set.
- `VLM_SAPO_WEIGHT_DIGEST=1` (tests, debugging): every rank appends the sha256 of its full weights after each step to
  `<run>/weight_digests/rank_<r>.jsonl` (`vlm_sapo.weight_digest`), to check that data-parallel ranks stay equal.

Size: one class whose methods are the phases of the step (`_collect`, `_batch_metrics`, `_advantages`, `_old_logprobs`,
`_update`, `validate`, checkpointing and engine-death handling) plus the batch surgery of resampling; over 500 lines
on purpose, since splitting it would scatter one loop's state across modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_sapo import faults
from vlm_sapo.algos import get_advantage_estimator, zero_variance_groups
from vlm_sapo.checkpoint import export_hf, latest_valid_checkpoint, load_checkpoint, save_checkpoint
from vlm_sapo.data import load_samples, prompt_model_inputs
from vlm_sapo.data.loaders import DataError
from vlm_sapo.data.mix import TaskMixSampler
from vlm_sapo.data.prompts import PromptTooLongError, RenderedPrompt
from vlm_sapo.data.sample import Sample
from vlm_sapo.eval import EvalConfig, evaluate, generate_and_score, load_benchmark
from vlm_sapo.learner import Learner, Objective, UpdateBatch, dist_env
from vlm_sapo.metrics_log import MetricsLog, read_metrics
from vlm_sapo.models.loading import load_policy, load_processor, model_family
from vlm_sapo.models.logprobs import build_policy_inputs
from vlm_sapo.models.moe import is_moe
from vlm_sapo.models.routing import routed_experts_batch, routing_shape, take_replay_counts
from vlm_sapo.models.tiny import resolve_tiny
from vlm_sapo.recipe import Recipe, RecipeError, dump_recipe
from vlm_sapo.resume_guard import FORCE, ResumeRefused, check_resume
from vlm_sapo.reward_signal import RewardSignal, reward_signal
from vlm_sapo.rollout import EngineContext, RolloutEngineError, Rollouts, SamplingConfig, build_engine, check_rollout
from vlm_sapo.scoring import RewardSpec, ScoreResult
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import coord_system_for_family, default_reward_specs, get_task, metric_key
from vlm_sapo.tasks.answers import AnswerSpread, answer_spread, parse_answers, warn_if_collapsed
from vlm_sapo.tasks.prompting import render_task_prompt
from vlm_sapo.weight_digest import DIGEST_ENV, record_weight_digest

log = logging.getLogger(__name__)

RESTARTS_ENV = "VLM_SAPO_ENGINE_RESTARTS"  # "<restarts>:<step the engine last died at>", set across re-executions
MAX_ENGINE_RESTARTS = 3


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite updates, a dead engine, no usable data); the message says why."""


@dataclass
class _Source:
    samples: list[Sample]
    task: str


@dataclass
class _Scored:
    """One step's rollouts with their prompts, samples and scores (prompt-major, G per prompt)."""

    prompts: list[RenderedPrompt]
    samples: list[Sample]
    rollouts: Rollouts
    scores: list[ScoreResult]

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.overall for s in self.scores], dtype=torch.float32).view(len(self.prompts), -1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _restart_state() -> tuple[int, int]:
    count, _, step = os.environ.get(RESTARTS_ENV, "0:0").partition(":")
    return int(count), int(step or 0)


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: str | None = None):
        """Each part is built from its own recipe section, in this order: processes, run folder and resume point
        (refused before anything is built if the recipe changed), policy and processor, data and rewards, learner,
        rollout engine, then the resumed state and the metrics log."""
        self.recipe = r = recipe
        check_rollout(r.rollout, source=r.name)  # the engine and its section, before anything loads
        self.faults = faults.from_env()  # named fault points for the tests: no-ops unless VLM_SAPO_FAULT is set
        self._setup_processes()
        self.run_dir = Path(r.logging.dir.format(name=r.name))
        self.ckpt_root = self.run_dir / "checkpoints"
        resume = resume if resume is not None else r.checkpoint.resume
        self.forced_resume = resume == FORCE
        ckpt = self._resume_point(resume)  # refused here, before anything is built, if the recipe changed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(dump_recipe(r))
        model = self._setup_policy()
        self._setup_data()
        self._setup_learner(model)
        self.engine = self._build_engine()
        self.sampling = SamplingConfig(temperature=r.rollout.temperature, top_p=r.rollout.top_p, top_k=r.rollout.top_k,
                                       max_new_tokens=r.rollout.max_new_tokens, stop=tuple(r.rollout.stop))
        self._setup_state(ckpt)

    # ------------------------------------------------------------------------------------------------ set-up helpers
    def _setup_processes(self) -> None:
        """Rank, world size, this rank's GPU and seed."""
        r = self.recipe
        self.launched = "RANK" in os.environ  # by torchrun/deepspeed, not by us (a restart must not reuse our port)
        dist_env.init_distributed()  # before reading rank and world size (a launcher may have set them)
        self.rank, self.world = dist_env.rank(), dist_env.world_size()
        if torch.cuda.is_available():  # one GPU per rank: the policy, the learner and a colocated vLLM all use it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if r.data.prompts_per_step % self.world:
            raise TrainingError(f"data.prompts_per_step ({r.data.prompts_per_step}) must be divisible by the number "
                                f"of processes ({self.world})")
        _seed_everything(r.seed + self.rank)

    def _setup_policy(self) -> torch.nn.Module:
        """The processor and the policy model (`model` section, video sampling from `data`); returns the model."""
        r = self.recipe
        m, d = r.model, r.data
        self.model_path = resolve_tiny(m.path)
        self.processor = load_processor(self.model_path, min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                        trust_remote_code=r.model.trust_remote_code, video_min_pixels=m.video_min_pixels,
                                        video_max_pixels=m.video_max_pixels, video_max_frames=d.video_max_frames,
                                        video_fps=d.video_fps)
        model = load_policy(self.model_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                            trust_remote_code=r.model.trust_remote_code)
        self.family = model_family(model.config)
        self.replay = self.recipe.algorithm.routing_replay
        if self.replay != "none" and not is_moe(model.config):
            raise RecipeError(str(self.recipe.name), [
                f"`algorithm.routing_replay: {self.replay}` needs a mixture-of-experts policy, but `model.path` "
                f"({m.path}) is a dense {self.family} model with no router to replay; use `none`"])
        self.patch_size = int(model.config.vision_config.patch_size)
        self.coord_system = d.coord_system if d.coord_system != "auto" else coord_system_for_family(self.family)
        self.pad_id = self.processor.tokenizer.pad_token_id
        return model

    def _setup_data(self) -> None:
        """Training and validation sources, the task-mix sampler, the reward pool and the eval benchmarks."""
        r = self.recipe
        self.skipped_rows = 0
        self.sources = [self._load_source(s) for s in r.data.train]
        self.val_sources = [self._load_source(s) for s in r.data.val]
        self.sampler = TaskMixSampler([len(s.samples) for s in self.sources], [s.weight for s in r.data.train],
                                      seed=r.seed, shuffle=r.data.shuffle)
        tasks = sorted({s.task for s in self.sources + self.val_sources})
        specs = ([RewardSpec.coerce(f) for f in r.rewards.functions] if r.rewards.functions
                 else default_reward_specs(tasks))
        self.pool = RewardPool(specs, workers=r.rewards.workers, timeout_s=r.rewards.timeout_s)
        self.pool.validate_tasks(tasks)
        self.eval_benchmarks = [load_benchmark(b, data_root=r.eval.data_root, limit=r.eval.limit)
                                for b in r.eval.benchmarks]

    def _setup_learner(self, model: torch.nn.Module) -> None:
        """The learner from the `learner` and `model` sections, and the objective of its updates from `algorithm`."""
        r, a = self.recipe, self.recipe.algorithm
        hparams = a.loss.hparams()
        if a.loss.name == "drgrpo" and "max_length" not in hparams:
            hparams["max_length"] = r.rollout.max_new_tokens  # the longest completion the rollout allows
        self.objective = Objective(a.loss.name, hparams, tis_cap=a.tis_cap, kl_coef=a.kl_coef,
                                   kl_estimator=a.kl_estimator)
        self.advantage = get_advantage_estimator(a.advantage.name)
        # the schedule spans every update (mini_batches per step); logprobs at the rollout's sampling temperature
        self.learner = Learner(model, r.learner, r.model, total_steps=r.learner.steps * a.mini_batches,
                               temperature=r.rollout.temperature, kl_reference=a.kl_coef > 0)

    def _setup_state(self, ckpt: Path | None) -> None:
        """Step and counters (from `ckpt` when resuming, with the weights pushed to the engine) and the metrics log."""
        r = self.recipe
        self.step = 0
        self.collapsed_tasks: set[str] = set()  # tasks whose training answers were collapsed at the last step
        self.dropped_prompts = 0
        self.render_skipped = 0  # rows whose prompt could not be rendered (data.on_bad_row=skip)
        state: dict[str, Any] = {}
        if ckpt is not None:
            state = load_checkpoint(self.learner, ckpt)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self.dropped_prompts = int(state.get("dropped_prompts", 0))
            self.render_skipped = int(state.get("render_skipped", 0))
            self._sync_weights()
            log.info("resumed from %s at step %d", ckpt, self.step)
        self.metrics = MetricsLog(self.run_dir, tensorboard=r.logging.tensorboard, wandb=r.logging.wandb,
                                  wandb_project=r.logging.wandb_project, config=r.model_dump(mode="json"),
                                  resume_step=self.step) if self.rank == 0 else None
        if ckpt is not None and self.metrics is not None:
            self._restore_metrics_line(state.get("metrics_line"))

    def _resume_point(self, resume: str) -> Path | None:
        """The checkpoint to resume (`auto`/`force`: the newest valid one; `never`: none; else that folder), refused
        when it was written under a recipe that differs outside `resume_guard.RESUMABLE_CHANGES`."""
        if resume == "never":
            return None
        ckpt = latest_valid_checkpoint(self.ckpt_root) if resume in ("auto", FORCE) else Path(resume)
        if ckpt is not None:
            try:
                check_resume(ckpt, self.recipe.model_dump(mode="json"), force=self.forced_resume)
            except ResumeRefused as e:
                raise TrainingError(str(e)) from None
        return ckpt

    def _restore_metrics_line(self, line: dict[str, Any] | None) -> None:
        """A run stopped between a checkpoint and its metrics line would leave that step out of metrics.jsonl for
        good; the checkpoint carries a copy of the line (without its own `time/checkpoint`)."""
        if line and self.step not in {m["step"] for m in read_metrics(self.run_dir)}:
            self.metrics.log(self.step, {k: float(v) for k, v in line["metrics"].items()}, line["record"])
            log.warning("step %d: metrics line restored from its checkpoint (the run stopped before logging it)",
                        self.step)

    def _load_source(self, cfg: Any) -> _Source:
        get_task(cfg.task)  # fail early, naming the task
        d = self.recipe.data
        result = load_samples(cfg.path, task=cfg.task, columns=cfg.columns or None, image_root=cfg.image_root,
                              split=cfg.split, limit=cfg.limit, on_bad_row=d.on_bad_row,
                              max_image_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio)
        for bad in result.skipped:
            log.warning("skipped %s", bad)
        if result.skipped:
            log.warning("%s: %d bad row(s) skipped, %d usable", cfg.path, len(result.skipped), len(result.samples))
        self.skipped_rows += len(result.skipped)
        return _Source(result.samples, cfg.task)

    def _build_engine(self) -> Any:
        """`rollout.backend` from the engine registry, built from its own section (`rollout.<backend>`)."""
        r = self.recipe
        samples = [s for src in self.sources + self.val_sources for s in src.samples]
        samples += [s for b in self.eval_benchmarks for s in b.samples]
        ctx = EngineContext(
            model_path=self.model_path, processor=self.processor, dtype=r.model.dtype, seed=r.seed + self.rank,
            policy=self.learner.policy, zero_stage=r.learner.zero_stage, colocated=True,
            return_routed_experts=self.replay == "r3",
            max_model_len=r.data.max_prompt_tokens + r.rollout.max_new_tokens,
            max_videos_per_prompt=int(any(s.video is not None for s in samples)),  # else no room kept for a video
        )
        return build_engine(r.rollout.backend, ctx, r.rollout.engine_section())

    def _sync_weights(self) -> None:
        if not self.engine.shares_weights:
            self.engine.update_weights(self.learner.named_weights_for_rollout())

    # ------------------------------------------------------------------------------------------------ one step
    def _render(self, sample: Sample) -> tuple[RenderedPrompt, Sample] | None:
        """The prompt evaluation renders too (`render_task_prompt`); over-long ones are counted and dropped."""
        d, m = self.recipe.data, self.recipe.model
        try:
            return render_task_prompt(self.processor, sample, coord_system=self.coord_system,
                                      min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                      image_patch_size=self.patch_size, max_prompt_tokens=d.max_prompt_tokens,
                                      system=d.system_prompt)
        except PromptTooLongError:
            if d.on_long_prompt == "fail":
                raise
            self.dropped_prompts += 1
            return None
        except DataError as e:  # found only when rendering (e.g. vision special tokens inside the question)
            if d.on_bad_row == "fail":
                raise TrainingError(f"step {self.step + 1}: {e} (data.on_bad_row=fail)") from e
            log.warning("skipped %s", e)
            self.render_skipped += 1
            return None

    def _next_prompts(self, count: int) -> list[tuple[RenderedPrompt, Sample]]:
        """`count` rendered prompts for this rank; prompts over the token limit are replaced by the next ones."""
        out: list[tuple[RenderedPrompt, Sample]] = []
        for _ in range(100):
            if len(out) == count:
                return out
            need = (count - len(out)) * self.world
            picks = self.sampler.next_batch(need)[self.rank :: self.world]
            for src, row in picks:
                got = self._render(self.sources[src].samples[row])
                if got is not None:
                    out.append(got)
        raise TrainingError(f"could not fill a batch of {count} prompts: {self.dropped_prompts} prompts were longer "
                            f"than data.max_prompt_tokens ({self.recipe.data.max_prompt_tokens}) and "
                            f"{self.render_skipped} could not be rendered")

    def _rollout_and_score(self, pairs: list[tuple[RenderedPrompt, Sample]], n: int,
                           sampling: SamplingConfig, *, training: bool = False) -> _Scored:
        prompts = [p for p, _ in pairs]
        samples = [s for _, s in pairs]
        rollouts = self.engine.generate(prompts, n=n, sampling=sampling)
        if training:
            self.faults.after_rollout(self.step + 1)
        items = [(samples[c.prompt_index].id, samples[c.prompt_index].task, c.text, samples[c.prompt_index].answer,
                  samples[c.prompt_index].meta) for c in rollouts.completions]
        return _Scored(prompts, samples, rollouts, self.pool.score(items))

    def _collect(self, timer: dict[str, float]) -> tuple[_Scored, list[_Scored]]:
        """Roll out and score until enough groups with reward variance are kept (DAPO's dynamic sampling)."""
        r = self.recipe
        want = r.data.prompts_per_step // self.world
        g = r.rollout.n
        rounds, kept_prompts, all_rounds = 0, 0, []
        kept: list[_Scored] = []
        while True:
            t0 = time.perf_counter()
            # a seed per (step, round, rank): a resumed run draws exactly the samples the uninterrupted run would
            seed = ((r.seed * 1_000_003 + self.step) * 64 + rounds) * 1024 + self.rank
            sampling = dataclasses.replace(self.sampling, seed=seed)
            self.faults.before_rollout(self.step + 1, self.engine)
            scored = self._rollout_and_score(self._next_prompts(want - kept_prompts), g, sampling, training=True)
            timer["rollout_and_reward"] = timer.get("rollout_and_reward", 0.0) + time.perf_counter() - t0
            all_rounds.append(scored)
            if r.algorithm.zero_variance_groups == "keep":
                keep = torch.ones(len(scored.prompts), dtype=torch.bool)
            else:
                keep = ~self._signal(scored).flat_groups()
            kept.append(_subset(scored, keep, g))
            kept_prompts += int(keep.sum())
            rounds += 1
            done = kept_prompts >= want or r.algorithm.zero_variance_groups != "resample"
            if done or rounds > r.algorithm.max_resample_rounds:
                break
        merged = _concat(kept, g)
        return merged, all_rounds

    def _signal(self, scored: _Scored) -> RewardSignal:
        """The advantage estimator's input for `scored`: rewards + overlong penalty, or the named components."""
        a = self.recipe.algorithm
        try:
            return reward_signal(scored.scores, scored.rollouts.completions, scored.rollouts.group_size,
                                 components=a.advantage.components, overlong=a.overlong,
                                 max_new_tokens=self.sampling.max_new_tokens)
        except ValueError as e:
            raise TrainingError(f"step {self.step + 1}: {e}") from e

    def _policy_batch(self, scored: _Scored, rows: list[int]) -> tuple[dict, torch.Tensor]:
        """Model inputs for the completions `rows` (flat indices), and the rollout engine's logprobs aligned to them."""
        g = scored.rollouts.group_size
        inputs_by_prompt: dict[int, dict] = {}
        prompt_inputs, completion_ids = [], []
        for k in rows:
            p = k // g
            if p not in inputs_by_prompt:
                inputs_by_prompt[p] = prompt_model_inputs(self.processor, scored.prompts[p])
            prompt_inputs.append(inputs_by_prompt[p])
            completion_ids.append(scored.rollouts.completions[k].completion_ids)
        batch = build_policy_inputs(prompt_inputs, completion_ids, self.pad_id)
        rollout_logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, k in enumerate(rows):
            start = int(batch["prompt_lengths"][i])
            lp = scored.rollouts.completions[k].logprobs
            rollout_logp[i, start : start + len(lp)] = lp
        batch.pop("prompt_lengths")
        if self.replay == "r3":  # the rollout's experts, replayed in the old-policy pass and every update
            batch["routed_experts"] = routed_experts_batch(
                [scored.rollouts.completions[k].routed_experts for k in rows], batch["input_ids"].shape[1])
        return batch, rollout_logp

    def train_step(self) -> tuple[dict[str, float], list[str]]:
        """One RL step; returns its metrics and the ids of the samples it rolled out (in order).

        Roll out and score (resampling flat groups if asked), advantages per group, mini-batches; the engine sleeps
        while the learner takes pi_old's logprobs and one update per mini-batch; it wakes and gets the new weights.
        """
        r, timer = self.recipe, {}
        t_step = time.perf_counter()
        scored, all_rounds = self._collect(timer)
        batch_ids = [s.id for part in all_rounds for s in part.samples]
        metrics = self._batch_metrics(scored, all_rounds)
        adv, rows = self._advantages(scored, metrics) if scored.prompts else (None, [])
        if not rows:
            metrics["batch/skipped_no_signal"] = 1.0
            metrics["time/step"] = time.perf_counter() - t_step
            return metrics | _phase_times(timer), batch_ids
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(r.seed * 100003 + self.step))
        order = [rows[j] for j in perm.tolist()]
        k = min(r.algorithm.mini_batches, len(order))
        minis = [order[i::k] for i in range(k)]

        if r.rollout.sleep_between_steps:  # the engine's memory goes to the learner until the weight sync
            t0 = time.perf_counter()
            self.engine.sleep()
            timer["engine_sleep"] = time.perf_counter() - t0
        prepared = self._old_logprobs(scored, minis, adv, timer)
        if self.replay != "none":
            metrics.update(_replay_metrics(self.learner.hf_model, scored, [b for b, *_ in prepared]))
        t0 = time.perf_counter()
        updates = [self._update(scored, *p) for p in prepared]
        timer["update"] = time.perf_counter() - t0
        if r.rollout.sleep_between_steps:
            t0 = time.perf_counter()
            self.engine.wake()
            timer["engine_wake"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._sync_weights()  # after the wake: a sleeping engine has no weights to load into
        timer["weight_sync"] = time.perf_counter() - t0

        metrics.update(self._update_metrics(updates))
        metrics.update(scored.rollouts.timing.as_metrics())
        metrics["batch/advantage_abs_mean"] = float(adv.abs().mean())
        metrics["time/step"] = time.perf_counter() - t_step
        return metrics | _phase_times(timer), batch_ids

    def _batch_metrics(self, scored: _Scored, all_rounds: list[_Scored]) -> dict[str, float]:
        """Rewards and answer spreads of the first round (with the collapse warning), the resampling, the data."""
        metrics = _reward_metrics(all_rounds[0], self.pool)
        for task, spread in _answer_spreads(all_rounds[0]).items():
            metrics.update(spread.metrics(f"answers/{task}"))
            if not spread.collapsed:
                self.collapsed_tasks.discard(task)
            elif task not in self.collapsed_tasks:  # warn when it happens, not at every step
                warn_if_collapsed(spread, task, f"step {self.step + 1} (training rollouts)")
                self.collapsed_tasks.add(task)
        if all_rounds[0].prompts:  # groups whose advantages are 0: equal rewards, or equal in every component
            metrics["batch/zero_variance_frac"] = float(self._signal(all_rounds[0]).flat_groups().float().mean())
        metrics["batch/resample_rounds"] = float(len(all_rounds) - 1)
        metrics["batch/groups_kept"] = float(len(scored.prompts))
        metrics["data/dropped_long_prompts"] = float(self.dropped_prompts)
        metrics["data/skipped_rows"] = float(self.skipped_rows + self.render_skipped)
        if not scored.prompts:
            log.warning("step %d: every group had equal rewards; no update", self.step + 1)
        return metrics

    def _advantages(self, scored: _Scored, metrics: dict[str, float]) -> tuple[torch.Tensor, list[int]]:
        """Per-completion advantages, and the rows that enter the loss (overlong filtering drops truncated ones:
        they count in their group's statistics, not in the loss)."""
        r = self.recipe
        rsig = self._signal(scored)
        adv = self.advantage(rsig.values, r.rollout.n, **r.algorithm.advantage.hparams()).reshape(-1)
        adv = self.faults.advantages(self.step + 1, adv)
        metrics.update(_overlong_metrics(rsig, r.algorithm.overlong))
        rows = [i for i in range(len(adv)) if not (r.algorithm.overlong and r.algorithm.overlong.filter
                                                    and rsig.truncated[i])]
        if not rows:
            log.warning("step %d: every completion was truncated (algorithm.overlong.filter); no update", self.step + 1)
        return adv, rows

    def _old_logprobs(self, scored: _Scored, minis: list[list[int]], adv: torch.Tensor,
                      timer: dict[str, float]) -> list[tuple]:
        """Every mini-batch's pi_old (and reference) logprobs before the first update: pi_old is this step's policy."""
        t0 = time.perf_counter()
        prepared = []
        on_policy = len(minis) == 1 and self.recipe.algorithm.tis_cap is None  # pi_old: the one update's start
        for rows in minis:
            batch, rollout_logp = self._policy_batch(scored, sorted(rows))
            if on_policy:  # (R2 is then a no-op: the update's own forward is the old-policy pass)
                old_logp = None
            elif self.replay == "r2":  # the old-policy pass's experts, replayed in every update
                old_logp, batch["routed_experts"] = self.learner.compute_logprobs(batch, return_routing=True)
            else:
                old_logp = self.learner.compute_logprobs(batch)
            ref_logp = None
            if self.recipe.algorithm.kl_coef > 0:  # the initial weights' logprobs, for the KL term
                t_ref = time.perf_counter()
                ref_logp = self.learner.compute_ref_logprobs(batch)
                timer["ref_logprobs"] = timer.get("ref_logprobs", 0.0) + time.perf_counter() - t_ref
            prepared.append((batch, rollout_logp, old_logp, ref_logp, adv[sorted(rows)]))
        timer["old_logprobs"] = time.perf_counter() - t0 - timer.get("ref_logprobs", 0.0)
        return prepared

    def _update(self, scored: _Scored, batch: dict, rollout_logp: torch.Tensor, old_logp: torch.Tensor | None,
                ref_logp: torch.Tensor | None, adv: torch.Tensor) -> dict[str, float]:
        """One learner update; too many non-finite updates in a row stop the run, naming the batch's samples."""
        m = self.learner.update(UpdateBatch(batch, adv, old_logp, rollout_logp, ref_logp), self.objective)
        self.faults.after_update(self.step + 1)
        if self.learner.nonfinite_in_a_row >= self.recipe.learner.max_nonfinite_in_a_row:
            ids = sorted({scored.samples[i].id for i in range(len(scored.samples))})
            raise TrainingError(f"step {self.step + 1}: {self.learner.nonfinite_in_a_row} non-finite updates in "
                                f"a row (learner.max_nonfinite_in_a_row); batch sample ids: {ids}")
        return m

    def _update_metrics(self, updates: list[dict[str, float]]) -> dict[str, float]:
        """The updates' metrics as `train/*` (means; maxima for `*_max`) and the routing replay's override share."""
        metrics = {}
        for key in updates[0]:
            vals = [u[key] for u in updates if key in u and math.isfinite(u[key])]
            if vals:
                metrics[f"train/{key}"] = max(vals) if key.endswith("_max") else sum(vals) / len(vals)
        metrics["train/skipped_updates"] = float(sum(u["skipped"] for u in updates))
        if self.replay != "none":
            replayed, changed = take_replay_counts(self.learner.hf_model)
            metrics["routing/replay_overrode_frac"] = changed / replayed if replayed else 0.0
        return metrics

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """`data.val` rows and `eval.benchmarks`, generated with eval's sampling and scored by the training rewards
        (`generate_and_score`, the path `vlm-sapo eval` takes)."""
        e, r = self.recipe.eval, self.recipe
        if not self.val_sources and not self.eval_benchmarks:
            return {}
        sampling = SamplingConfig(temperature=e.temperature, max_new_tokens=e.max_new_tokens or self.sampling.max_new_tokens,
                                  top_p=1.0, top_k=0, stop=self.sampling.stop, seed=r.seed)
        out: dict[str, float] = {}
        for src in self.val_sources:
            pairs = [p for p in (self._render(s) for s in src.samples[: e.limit]) if p is not None]
            if not pairs:
                continue
            [part] = generate_and_score(self.engine, [pairs], self.pool, n=e.n, sampling=sampling)
            scored = _Scored(part.prompts, part.samples, part.rollouts, part.scores)
            for key, value in _reward_metrics(scored, None).items():
                out[f"val/{key.removeprefix('reward/')}"] = value
            for task, spread in _answer_spreads(scored).items():
                out.update(spread.metrics(f"val/answers/{task}"))
                warn_if_collapsed(spread, task, f"step {self.step} validation")
            task = get_task(src.task)
            own = metric_key(task, self.pool.specs)
            if own is not None:  # the task's own metric, when the recipe kept the task's reward
                metric = [sc.scores.get(own, 0.0) for sc in scored.scores]
                out[f"val/{src.task}/{task.metric}"] = sum(metric) / len(metric)
        if self.eval_benchmarks:
            config = EvalConfig(family=self.family, n=e.n, sampling=sampling, max_prompt_tokens=r.data.max_prompt_tokens,
                                system=r.data.system_prompt, coord_system=self.coord_system)
            res = evaluate(self.engine, self.processor, self.eval_benchmarks, config,
                           out_dir=self.run_dir / "eval" / f"step_{self.step:06d}", progress=False)
            out.update(res.metrics())
        return out

    # ------------------------------------------------------------------------------------------------ the run
    def fit(self) -> Path:
        from tqdm import tqdm

        r = self.recipe
        bar = tqdm(total=r.learner.steps, initial=self.step, desc=r.name, disable=not r.logging.progress or self.rank)
        restart = False
        try:
            while self.step < r.learner.steps:
                try:
                    metrics, batch_ids = self.train_step()
                    self.step += 1
                    last = self.step == r.learner.steps
                    if r.eval.every_steps and self.step % r.eval.every_steps == 0 or (last and r.eval.at_end):
                        t0 = time.perf_counter()
                        metrics.update(self.validate())
                        metrics["time/validate"] = time.perf_counter() - t0
                except RolloutEngineError as e:
                    restart = self._engine_died(e)
                    break
                if _restart_state()[0] and self.step > _restart_state()[1]:
                    os.environ.pop(RESTARTS_ENV, None)  # progress past the last engine death
                if os.environ.get(DIGEST_ENV):
                    record_weight_digest(self.learner, self.run_dir, self.step, self.rank)
                record = {"batch_ids": batch_ids}
                if r.checkpoint.every_steps and (self.step % r.checkpoint.every_steps == 0 or last):
                    t0 = time.perf_counter()
                    self._save_checkpoint(metrics, record)
                    metrics["time/checkpoint"] = time.perf_counter() - t0
                    self.faults.after_checkpoint(self.step)
                if self.metrics is not None:
                    self.metrics.log(self.step, metrics, record)
                bar.set_postfix(reward=f"{metrics.get('reward/overall', float('nan')):.3f}",
                                step_s=f"{metrics['time/step']:.1f}")
                bar.update(1)
            if r.checkpoint.export_hf and not restart:
                export_hf(self.learner, self.model_path, self.run_dir / "hf")
        finally:
            bar.close()
            self.close()
        if restart:
            self._reexec_with_resume()
        return self.run_dir

    def _save_checkpoint(self, metrics: dict[str, float], record: dict[str, Any]) -> None:
        """Write this step's checkpoint, with a copy of its metrics line (restored on resume if the run stopped before
        logging it); a failure (disk full, ...) stops the run with the previous checkpoint intact."""
        line = {"metrics": {k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}, "record": record}
        try:
            self.faults.mid_checkpoint(self.step, self.learner)
            save_checkpoint(self.learner, self.ckpt_root, self.step,
                            {"step": self.step, "sampler": self.sampler.state_dict(),
                             "dropped_prompts": self.dropped_prompts, "render_skipped": self.render_skipped,
                             "recipe": self.recipe.model_dump(mode="json"), "metrics_line": line},
                            keep_last=self.recipe.checkpoint.keep_last)
        except Exception as e:
            raise TrainingError(
                f"step {self.step}: writing the checkpoint {self.ckpt_root / f'step_{self.step}'} failed "
                f"({type(e).__name__}: {e}); disk full? The run stops without logging this step; `--resume` continues "
                f"from {latest_valid_checkpoint(self.ckpt_root) or 'the start (no valid checkpoint)'}") from e

    def _engine_died(self, error: RolloutEngineError) -> bool:
        """Whether to restart (rollout.on_engine_death), else raise naming the engine, the step and the resume point."""
        r = self.recipe
        step = self.step + 1
        resume_from = latest_valid_checkpoint(self.ckpt_root) if self.rank == 0 else None
        where = f"`--resume` continues from {resume_from or 'the start (no valid checkpoint yet)'}"
        if r.rollout.on_engine_death == "fail":
            raise TrainingError(f"step {step}: the rollout engine died: {error}. rollout.on_engine_death=fail: the run "
                                f"stops; nothing of step {step} was saved; {where}") from error
        if self.world > 1 or self.launched:
            raise TrainingError(f"step {step}: the rollout engine died: {error}. rollout.on_engine_death=restart "
                                "re-executes a single process only; under a launcher use its restarts (torchrun "
                                f"--max-restarts); {where}") from error
        count, last_death = _restart_state()
        if count >= MAX_ENGINE_RESTARTS:
            raise TrainingError(f"step {step}: the rollout engine died again after {count} restart(s) without a step "
                                f"completing past step {last_death}: {error}; {where}") from error
        os.environ[RESTARTS_ENV] = f"{count + 1}:{step}"
        log.error("step %d: the rollout engine died (%s); restart %d of %d: re-executing with --resume, %s", step,
                  error, count + 1, MAX_ENGINE_RESTARTS, where)
        return True

    def _reexec_with_resume(self) -> None:
        """Replace this process with `python -m vlm_sapo.cli train <run>/recipe.yaml --resume` (never returns)."""
        if not self.launched:  # our own one-process group: let the new process pick a fresh port
            for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(var, None)
        argv = [sys.executable, "-m", "vlm_sapo.cli", "train", str(self.run_dir / "recipe.yaml"), "--resume"]
        if self.forced_resume:  # the newest checkpoint may still be one written under the recipe before the force
            argv.append(FORCE)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)

    def close(self) -> None:
        """Release everything, each part even when another fails (a dead engine must not keep the pool alive)."""
        for part in (self.metrics, self.pool, self.engine):
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("closing %s failed", type(part).__name__)


# ---------------------------------------------------------------------------------------------------------- helpers
def _subset(scored: _Scored, keep: torch.Tensor, g: int) -> _Scored:
    idx = [i for i, k in enumerate(keep.tolist()) if k]
    comps = [c for i in idx for c in scored.rollouts.groups()[i]]
    return _Scored([scored.prompts[i] for i in idx], [scored.samples[i] for i in idx],
                   _regroup(comps, scored.rollouts), [scored.scores[i * g + j] for i in idx for j in range(g)])


def _concat(parts: list[_Scored], g: int) -> _Scored:
    comps = [c for p in parts for c in p.rollouts.completions]
    return _Scored([x for p in parts for x in p.prompts], [x for p in parts for x in p.samples],
                   _regroup(comps, parts[0].rollouts), [x for p in parts for x in p.scores])


def _regroup(comps: list, like: Rollouts) -> Rollouts:
    """Completions renumbered prompt-major, keeping the timing of the rollouts they came from."""
    from dataclasses import replace

    g = like.group_size
    renumbered = [replace(c, prompt_index=k // g, sample_index=k % g) for k, c in enumerate(comps)]
    return Rollouts(renumbered, g, like.timing, like.engine, like.weight_version, like.sampling)


def _reward_metrics(scored: _Scored, pool: RewardPool | None) -> dict[str, float]:
    """Mean of every named score overall and per task, response lengths, finish reasons, reward-failure counters."""
    out: dict[str, float] = {}
    comps = scored.rollouts.completions
    g = scored.rollouts.group_size
    by_task: dict[str, list[int]] = {}
    for k in range(len(comps)):
        by_task.setdefault(scored.samples[k // g].task, []).append(k)
    out["reward/overall"] = sum(s.overall for s in scored.scores) / max(len(scored.scores), 1)
    for task, ks in by_task.items():
        out[f"reward/{task}/overall"] = sum(scored.scores[k].overall for k in ks) / len(ks)
        keys = sorted({key for k in ks for key in scored.scores[k].scores})
        for key in keys:
            vals = [scored.scores[k].scores[key] for k in ks if key in scored.scores[k].scores]
            out[f"reward/{task}/{key}"] = sum(vals) / len(vals)
    lengths = [len(c.completion_ids) for c in comps]
    out["response/length_mean"] = sum(lengths) / max(len(lengths), 1)
    out["response/length_max"] = float(max(lengths, default=0))
    out["response/truncated_frac"] = sum(c.finish_reason == "length" for c in comps) / max(len(comps), 1)
    out["batch/zero_variance_frac"] = float(zero_variance_groups(scored.rewards, g).float().mean()) if comps else 0.0
    if pool is not None:
        out.update({f"reward_pool/{k}": float(v) for k, v in pool.stats().items()})
    return out


def _answer_spreads(scored: _Scored) -> dict[str, AnswerSpread]:
    """Per task, how spread out the parsed answers of the completions are (collapse onto one answer shows here)."""
    g = scored.rollouts.group_size
    texts: dict[str, list[str]] = {}
    for k, c in enumerate(scored.rollouts.completions):
        texts.setdefault(scored.samples[k // g].task, []).append(c.text)
    return {task: answer_spread(parse_answers(task, t)) for task, t in texts.items()}


def _overlong_metrics(rsig: RewardSignal, cfg: Any) -> dict[str, float]:
    """DAPO overlong shaping and filtering, over the completions that got advantages this step."""
    if cfg is None:
        return {}
    out = {"overlong/truncated_frac": float(rsig.truncated.float().mean())}
    if rsig.penalty is not None:
        out["overlong/penalty_mean"] = float(rsig.penalty.mean())
        out["overlong/penalized_frac"] = float((rsig.penalty < 0).float().mean())
    if cfg.filter:
        out["overlong/masked"] = float(rsig.truncated.sum())
    return out


def _phase_times(timer: dict[str, float]) -> dict[str, float]:
    return {f"time/{k}": v for k, v in timer.items()}


def _replay_metrics(model: torch.nn.Module, scored: _Scored, batches: list[dict]) -> dict[str, float]:
    """What routing replay holds for a step: bytes of expert indices (the rollout's, R3, and the learner batches'),
    and the routing shape. `take_replay_counts` is reset here so the step's update counts start at zero."""
    layers, top_k, _ = routing_shape(model)
    take_replay_counts(model)
    rollout = sum(c.routed_experts.numel() * c.routed_experts.element_size()
                  for c in scored.rollouts.completions if c.routed_experts is not None)
    learner = sum(b["routed_experts"].numel() * b["routed_experts"].element_size() for b in batches
                  if "routed_experts" in b)
    return {"routing/rollout_index_bytes": float(rollout), "routing/learner_index_bytes": float(learner),
            "routing/bytes_per_token": float(layers * top_k)}


def train(recipe: Recipe, *, resume: str | None = None) -> Path:
    try:
        trainer = Trainer(recipe, resume=resume)
    except (DataError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from e
    return trainer.fit()
