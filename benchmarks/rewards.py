"""Reward scoring throughput (samples/s) for math, chart and grounding on the ../shared/data samples, in the reward
pool's worker processes (`vlm_sapo/scoring/pool.py`) and in-process without it.

    .venv/bin/python benchmarks/rewards.py                              # ~1 minute
    .venv/bin/python benchmarks/rewards.py --repeat 20 --workers 1,2,4 --json out.json

Samples: Geometry3K (math, 300), MultiChartQA single-chart (chart, 142), COCO128 grounding (grounding, 164), loaded by
the evaluation's own benchmark adapters. Each sample gets four completions shaped like a policy's, so every parse
path is timed: the gold answer in the expected format, a wrong answer, a `\\boxed{}` answer without tags, and
unformatted text; `--repeat` multiplies the list. Grounding meta uses `coord_system=abs_original` (boxes in
original-image pixels), so no image is decoded. "in-process" calls each task's reward function in a loop, as a
trainer without a pool would; "pool" is `RewardPool.score` over the whole list (time-limited worker processes; the
per-call timeout is what the pool buys, not speed). Times are medians of `--rounds` rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file's own folder comes first on sys.path and its name would shadow the project's `rewards` package (the
# reward pool's workers get this sys.path too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
BENCHMARKS = {"math": "geometry3k", "chart": "chartqa=multichartqa_single", "grounding": "refcoco=coco128_grounding"}


def completions(sample) -> list[str]:
    gold = sample.answer
    if sample.task == "grounding":
        x1, y1, x2, y2 = (float(v) for v in gold)
        right = f"[{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]"
        wrong = f"[{x1 / 2:.0f}, {y1 / 2:.0f}, {x2 / 2:.0f}, {y2 / 2:.0f}]"
    else:
        right, wrong = str(gold), f"{gold} and 17" if sample.task == "chart" else "42"
    return [f"<think>Reading the figure carefully.</think><answer>{right}</answer>",
            f"<think>A guess.</think><answer>{wrong}</answer>",
            f"The result is \\boxed{{{right}}}.", "I am not sure what the image shows."]


def items_for(task: str, data_root: Path, repeat: int) -> list[tuple]:
    from vlm_sapo.eval import load_benchmark

    bench = load_benchmark(BENCHMARKS[task], data_root=data_root)
    out = []
    for s in bench.samples:
        meta = dict(s.meta)
        if task == "grounding":
            meta["coord_system"] = "abs_original"
        out += [(s.id, s.task, c, s.answer, meta) for c in completions(s)]
    return out * repeat


def in_process(items: list[tuple]) -> float:
    from vlm_sapo.scoring import load_reward
    from vlm_sapo.tasks import default_reward_specs

    rewards = {}
    t0 = time.perf_counter()
    for _, task, completion, gold, meta in items:
        if task not in rewards:
            rewards[task] = [load_reward(spec) for spec in default_reward_specs([task])]
        for reward in rewards[task]:
            reward.score_one(completion, gold, meta)
    return time.perf_counter() - t0


def pooled(pool, items: list[tuple]) -> float:
    t0 = time.perf_counter()
    results = pool.score(items)
    elapsed = time.perf_counter() - t0
    failed = sum(r.error is not None for r in results)
    if failed:
        raise RuntimeError(f"{failed} of {len(items)} samples failed to score: {results[0].error}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--repeat", type=int, default=2, help="copies of each task's item list")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="pool sizes to time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from vlm_sapo.scoring.pool import RewardPool
    from vlm_sapo.tasks import default_reward_specs

    rows = []
    workers = [int(w) for w in args.workers.split(",")]
    pools = {w: RewardPool(default_reward_specs(list(BENCHMARKS)), workers=w, timeout_s=30) for w in workers}
    try:
        for task in BENCHMARKS:
            items = items_for(task, args.data_root, args.repeat)
            row = {"task": task, "samples": len(items)}
            in_process(items[:50])  # warm-up: imports, math-verify's first parse
            row["in_process"] = len(items) / statistics.median(in_process(items) for _ in range(args.rounds))
            for w, pool in pools.items():
                pooled(pool, items[:50])
                row[f"pool_{w}"] = len(items) / statistics.median(pooled(pool, items) for _ in range(args.rounds))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for pool in pools.values():
            pool.close()

    cols = ["in_process"] + [f"pool_{w}" for w in workers]
    print("\n| task | samples | " + " | ".join(f"{c.replace('_', ' ')} samples/s" for c in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['task']} | {r['samples']} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
