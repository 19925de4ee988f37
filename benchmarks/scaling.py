"""How vlm_sapo's RL step time and peak memory grow with G, completion length and image size (CPU, tiny Qwen2.5-VL).

    .venv/bin/python benchmarks/scaling.py                  # ~5 minutes: G 2..16, length 64..256, 4 image sizes
    .venv/bin/python benchmarks/scaling.py --full           # + lengths 512 and 1024, 3 timed steps per point
    .venv/bin/python benchmarks/scaling.py --out benchmarks/results --threads 1

Each point is a fresh `side_ours.py` process (the trainer of `vs_trl.py`, same recipe: 2 prompts per step, fp32,
ZeRO-2, SAPO, one update per batch), one warm-up step, then `--steps` timed steps (median). Sweeps, one knob at a
time from the base point (G = 4, 32 new tokens, min/max pixels 3136/12544): G in 2, 4, 8, 16; max_new_tokens in
64 .. 1024 (a random model almost never stops early, so this is the completion length); image pixels
(min_pixels = max_pixels) 3136, 12544, 50176, 200704, i.e. 4, 16, 64, 256 image tokens per prompt. Reported: s/step,
the rollout and learner parts, tokens in the step (prompt + completion, all samples), and peak RSS of the process and
its reward worker (start-up included, so the constant part is the model, optimizer state and libraries). Writes a
table (markdown), `scaling.json` and `scaling.png` under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/rewards.py would shadow the project's `rewards` package (reward workers get this sys.path too): take this
# folder off the path and import the sibling modules as `benchmarks.*` from the repository root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_common import REPO, Work, fixtures  # noqa: E402
from benchmarks.vs_trl import OURS_PY, Side  # noqa: E402

BASE = Work(prompts=2, g=4, max_new_tokens=32)


def sweeps(full: bool) -> dict[str, list[tuple[float, Work]]]:
    lengths = (64, 128, 256, 512, 1024) if full else (64, 128, 256)
    return {
        "G": [(g, dataclasses.replace(BASE, g=g)) for g in (2, 4, 8, 16)],
        "completion tokens": [(n, dataclasses.replace(BASE, max_new_tokens=n)) for n in lengths],
        "image tokens per prompt": [(px // 784, dataclasses.replace(BASE, min_pixels=px, max_pixels=px))
                                    for px in (3136, 12544, 50176, 200704)],
    }


def measure(work: Work, steps: int, threads: int, log_dir: Path) -> dict:
    side = Side("scaling", OURS_PY, "side_ours.py", work, threads, log_dir)
    try:
        side.step()
        side.results.clear()
        rs = [side.step() for _ in range(steps)]
    finally:
        side.close()
    med = statistics.median
    return {"step_s": med(r["step_s"] for r in rs), "rollout_s": med(r["rollout_s"] for r in rs),
            "learner_s": med(r["learner_s"] for r in rs),
            "tokens": med(r["prompt_tokens"] * work.g + r["completion_tokens"] for r in rs),
            "completion_tokens": med(r["completion_tokens"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, (knob, points) in zip(axes, results.items()):
        x = [p["x"] for p in points]
        ax.plot(x, [p["step_s"] for p in points], "o-", label="step")
        ax.plot(x, [p["rollout_s"] for p in points], "s--", label="rollout + reward")
        ax.plot(x, [p["learner_s"] for p in points], "^--", label="learner")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # log-log: slope 1 is linear growth
        ax.set_xlabel(knob)
        ax.set_ylabel("seconds per RL step")
        mem = ax.twinx()
        mem.plot(x, [p["peak_rss_mb"] / 1024 for p in points], "k:", marker="x", label="peak RSS")
        mem.set_ylabel("peak RSS (GB)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("vlm_sapo RL step on CPU: tiny Qwen2.5-VL (151,936 vocab), 2 prompts per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(path: Path) -> None:
    """Redraw scaling.png from a scaling.json."""
    data = json.loads(path.read_text())
    plot(data["results"], path.with_name("scaling.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="longer completions (512, 1024) and 3 timed steps")
    ap.add_argument("--steps", type=int, help="timed steps per point (default 1, 3 with --full)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--replot", type=Path, help="only redraw the PNG from this scaling.json")
    args = ap.parse_args()
    if args.replot:
        return replot(args.replot)
    steps = args.steps or (3 if args.full else 1)
    fixtures()
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = REPO / "benchmarks" / ".cache" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for knob, points in sweeps(args.full).items():
        results[knob] = []
        for x, work in points:
            r = {"x": x, **measure(work, steps, args.threads, log_dir)}
            results[knob].append(r)
            print(f"{knob} = {x}: {r['step_s']:.2f} s/step (rollout {r['rollout_s']:.2f}, learner "
                  f"{r['learner_s']:.2f}), {r['tokens']:.0f} tokens, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| knob | value | s/step | rollout s | learner s | tokens/step | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for knob, points in results.items():
        for p in points:
            print(f"| {knob} | {p['x']} | {p['step_s']:.2f} | {p['rollout_s']:.2f} | {p['learner_s']:.2f} | "
                  f"{p['tokens']:.0f} | {p['peak_rss_mb']:.0f} |")
    (args.out / "scaling.json").write_text(json.dumps({"steps": steps, "threads": args.threads,
                                                       "base": dataclasses.asdict(BASE), "results": results}, indent=2))
    plot(results, args.out / "scaling.png")
    print(f"\nwrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
