"""Rollout throughput of the two engines on the same prompts, side by side, plus vLLM's start-up time.

    .venv/bin/python benchmarks/rollout.py                          # tiny Qwen2.5-VL, 8 prompts x n=4 x 64 tokens
    .venv/bin/python benchmarks/rollout.py --model DIR --prompts 16 --n 8 --max-new-tokens 256 --json out.json

Prompts are Geometry3K samples (the repo's MIT fixture rows, else ../shared/data/geometry3k), rendered once with the
project's own `render_prompt`. Each backend runs in a fresh subprocess (vLLM pins the torch thread count of the
process it lives in, which would slow an HF engine sharing it): load/start, one short warm-up call, then
`--repeats` timed `generate` calls at temperature 1 with a fixed seed; the best is reported. Tokens/s counts
generated tokens only. Without `--model` a tiny random Qwen2.5-VL is built in a temp folder (its completions rarely
stop early, so nearly every sample runs to max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIRS = (REPO / "tests" / "fixtures" / "geometry3k", REPO / ".." / "shared" / "data" / "geometry3k")


def _rows_file() -> Path:
    for folder in DATA_DIRS:
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if files:
            return files[0]
    raise FileNotFoundError(f"no Geometry3K rows in {', '.join(str(d) for d in DATA_DIRS)}")


def _prompts(model: str, count: int):
    from vlm_sapo.data import load_samples, render_prompt
    from vlm_sapo.models.loading import load_processor

    processor = load_processor(model)
    ip = processor.image_processor
    size = dict(ip.size)
    samples = load_samples(_rows_file(), task="math", limit=count).samples
    prompts = [
        render_prompt(processor, s, instruction="Answer with the letter of the correct choice.",
                      min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
                      image_patch_size=ip.patch_size, max_prompt_tokens=None)
        for s in samples
    ]
    return processor, prompts


def run_backend(args: argparse.Namespace) -> dict:
    """Measure one backend in this process (called in a fresh subprocess)."""
    import torch

    from vlm_sapo.recipe import apply_overrides
    from vlm_sapo.rollout import EngineContext, SamplingConfig, build_engine

    processor, prompts = _prompts(args.model, args.prompts)
    result: dict = {"backend": args.backend, "prompts": len(prompts), "n": args.n,
                    "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads()}
    if args.backend == "vllm":
        t0 = time.perf_counter()
        import vllm  # noqa: F401  (import time reported separately from engine start-up)

        result["import_s"] = time.perf_counter() - t0
    ctx = EngineContext(model_path=args.model, processor=processor, dtype=args.dtype, max_model_len=args.max_model_len)
    t0 = time.perf_counter()
    engine = build_engine(args.backend, ctx, apply_overrides({}, args.engine_option).get(args.backend))
    result["startup_s"] = getattr(engine, "startup_s", time.perf_counter() - t0)  # vLLM's: its LLM() alone
    warm = engine.generate(prompts[:1], 1, SamplingConfig(max_new_tokens=4, seed=0))
    result["warmup_s"] = warm.timing.seconds
    runs = []
    for r in range(args.repeats):
        ro = engine.generate(prompts, args.n, SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens,
                                                             seed=100 + r))
        runs.append({"seconds": ro.timing.seconds, "completion_tokens": ro.timing.completion_tokens,
                     "tokens_per_s": ro.timing.tokens_per_s, "prompt_tokens": ro.timing.prompt_tokens,
                     "finish": ro.finish_reason_counts()})
    best = max(runs, key=lambda x: x["tokens_per_s"])
    result.update(runs=runs, generate_s=best["seconds"], tokens_per_s=best["tokens_per_s"],
                  completion_tokens=best["completion_tokens"], prompt_tokens=best["prompt_tokens"])
    engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: build a tiny random Qwen2.5-VL)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="hf,vllm", help="registered rollout engines (vlm_sapo.rollout)")
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--engine-option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                        help="an engine's own option, as in a recipe's rollout.<backend> section "
                             "(e.g. vllm.cpu_kvcache_gib=2, the vLLM KV cache on CPU); repeatable")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # internal: run one backend in this process
    args = parser.parse_args()

    if args.backend:
        print(json.dumps(run_backend(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from vlm_sapo.models.tiny import build_tiny

            args.model = str(build_tiny(Path(tmp) / "tiny25", "qwen2_5_vl", seed=0))
        results = []
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--backend", backend, "--model", args.model,
                   "--prompts", str(args.prompts), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                   "--repeats", str(args.repeats),
                   "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                   *[f"--engine-option={o}" for o in args.engine_option if o.startswith(f"{backend}.")]]
            t0 = time.perf_counter()
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{backend} benchmark failed (exit {proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["process_s"] = time.perf_counter() - t0
            results.append(result)

    print(f"\n{args.prompts} prompts x n={args.n} x max {args.max_new_tokens} new tokens, model {args.model}")
    header = (f"{'backend':8} {'start-up s':>10} {'warm-up s':>9} {'generate s':>10} {'tokens':>7} {'tokens/s':>9} "
              f"{'process s':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['backend']:8} {r['startup_s']:10.1f} {r['warmup_s']:9.2f} {r['generate_s']:10.2f} "
              f"{r['completion_tokens']:7d} {r['tokens_per_s']:9.1f} {r['process_s']:9.1f}")
    for r in results:
        if "import_s" in r:
            print(f"(vllm: `import vllm` {r['import_s']:.1f} s before start-up; torch threads {r['torch_threads']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
