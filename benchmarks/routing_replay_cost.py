"""What routing replay costs per RL step: wall time by phase and the bytes of expert indices it holds.

    .venv/bin/python benchmarks/routing_replay_cost.py            # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/routing_replay_cost.py --modes none r3 --steps 3 --repeats 1   # a quick look
    .venv/bin/python benchmarks/routing_replay_cost.py --micro-only      # the machinery alone, about 1 minute

Each arm is one `vlm-sapo train recipes/smoke_cpu.yaml` subprocess on the tiny Qwen3-VL-MoE (`tiny:qwen3_vl_moe`:
2 layers of 4 experts, top-2, the real 151,936-token vocabulary), transformers rollouts, the given number of updates
per rollout batch, one torch thread; arms alternate (`--repeats`) so that a busy machine slows them alike. Reported:
medians over the steps after the first (which pays start-up costs) of `time/step` and its phases, and the
`routing/*` bytes: the rollout's uint8 indices (R3) and the learner batches' int16 indices (R2 and R3). The bytes
scale as tokens x MoE layers x top-k; the last lines extrapolate them to Qwen3-VL-30B-A3B (48 layers, top-8).
Whole steps on a shared machine vary by more than the replay costs, so the script then times the machinery alone
(`micro`): generate with and without recording, forward + backward with and without replay, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_sapo.metrics_log import read_metrics  # noqa: E402

PHASES = ("time/step", "time/rollout_and_reward", "time/old_logprobs", "time/update")
BYTES = ("routing/rollout_index_bytes", "routing/learner_index_bytes")


def run_arm(mode: str, out: Path, args: argparse.Namespace) -> list[dict]:
    over = [f"model.path={args.model}", f"algorithm.routing_replay={mode}", f"learner.steps={args.steps}",
            f"algorithm.mini_batches={args.mini_batches}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"data.prompts_per_step={args.prompts}",
            f"logging.dir={out}", "logging.tensorboard=false", "logging.progress=false",
            "checkpoint.every_steps=0", "checkpoint.export_hf=false", "checkpoint.resume=never"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vlm_sapo.cli", "train", "recipes/smoke_cpu.yaml", *over],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode}: training failed:\n{proc.stderr[-3000:]}")
    return read_metrics(out)[1:]


def micro(args: argparse.Namespace, repeats: int = 15) -> None:
    """The replay machinery alone, in one process, interleaved, best of `repeats`: HF generate with and without
    recording the routers, and a learner forward + backward with and without replaying them."""
    import time

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from moe_logprobs import prompts

    from vlm_sapo.data import prompt_model_inputs
    from vlm_sapo.models.loading import load_policy, load_processor
    from vlm_sapo.models.logprobs import build_policy_inputs, token_logprobs
    from vlm_sapo.models.routing import routed_experts_batch
    from vlm_sapo.models.tiny import resolve_tiny
    from vlm_sapo.rollout import SamplingConfig
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine

    torch.set_num_threads(1)
    path = resolve_tiny(args.model)
    processor = load_processor(path)
    model = load_policy(path, dtype="float32", device="cpu")
    rendered = prompts(processor)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    engines = {rec: HFRolloutEngine(model, processor, return_routed_experts=rec) for rec in (False, True)}
    best = {k: float("inf") for k in ("gen", "gen_rec", "fb", "fb_replay")}
    ro = None
    for _ in range(repeats):
        for rec in (False, True):
            t = time.perf_counter()
            out = engines[rec].generate(rendered, args.n, sampling)
            best["gen_rec" if rec else "gen"] = min(best["gen_rec" if rec else "gen"], time.perf_counter() - t)
            ro = out if rec else ro
    comps = ro.completions
    per_prompt = [prompt_model_inputs(processor, p) for p in rendered]
    batch = build_policy_inputs([per_prompt[c.prompt_index] for c in comps], [c.completion_ids for c in comps],
                                processor.tokenizer.pad_token_id)
    replayed = {**batch, "routed_experts": routed_experts_batch([c.routed_experts for c in comps],
                                                                batch["input_ids"].shape[1])}
    for _ in range(repeats):
        for key, inputs in (("fb", batch), ("fb_replay", replayed)):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            logp, _ = token_logprobs(model, inputs)
            logp.sum().backward()
            best[key] = min(best[key], time.perf_counter() - t)
    tokens = int(batch["attention_mask"].sum())
    print(f"\nmachinery alone ({len(comps)} completions, {tokens} tokens, best of {repeats}, one thread):")
    print(f"- hf generate {best['gen']:.3f} s, recording the routers {best['gen_rec']:.3f} s "
          f"({best['gen_rec'] / best['gen'] - 1:+.1%})")
    print(f"- learner forward + backward {best['fb']:.3f} s, replaying {best['fb_replay']:.3f} s "
          f"({best['fb_replay'] / best['fb'] - 1:+.1%})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["none", "r2", "r3"], choices=["none", "r2", "r3"])
    parser.add_argument("--model", default="tiny:qwen3_vl_moe")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--micro-only", action="store_true", help="only the in-process machinery timing")
    args = parser.parse_args(argv)
    if args.micro_only:
        micro(args)
        return
    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="replay_cost_") as tmp:
        for rep in range(args.repeats):
            for mode in args.modes:
                rows[mode] += run_arm(mode, Path(tmp) / f"{mode}_{rep}", args)
    print(f"{args.model}, {args.prompts} prompts x G = {args.n} x {args.max_new_tokens} new tokens, "
          f"{args.mini_batches} updates per batch; medians of {len(rows[args.modes[0]])} steps")
    print("| replay | " + " | ".join(k.removeprefix("time/") + " s" for k in PHASES)
          + " | rollout index bytes | learner index bytes |")
    print("|---" * (len(PHASES) + 3) + "|")
    for mode, rs in rows.items():
        cells = [f"{statistics.median(r[k] for r in rs):.2f}" for k in PHASES]
        cells += [f"{statistics.median(r.get(k, 0.0) for r in rs):.0f}" for k in BYTES]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    per_token = rows[args.modes[-1]][0].get("routing/bytes_per_token")
    if per_token:
        print(f"index bytes per token: {per_token:.0f} in the rollout (uint8), {2 * per_token:.0f} in a learner "
              "batch (int16, -1 = free); Qwen3-VL-30B-A3B (48 MoE layers, top-8): 384 and 768 bytes per token, "
              "e.g. 6.3 MB for a mini-batch of 8 x 1024 tokens")
    micro(args)


if __name__ == "__main__":
    main()
