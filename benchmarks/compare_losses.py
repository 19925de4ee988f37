"""SAPO vs GSPO vs GRPO (and DAPO) in miniature: the demo's cold-start model trained off-policy, 3 seeds each.

    .venv/bin/python benchmarks/compare_losses.py                 # about 25 minutes on 2 CPU cores
    .venv/bin/python benchmarks/compare_losses.py --losses sapo grpo --seeds 0 --rl-steps 20   # a quick look

Every run starts from the same cold-start checkpoint (built once, as `make demo` builds it) and trains with
`vlm_sapo/demo/demo_cpu.yaml` under the same budget, changing only the policy loss (each with its paper's defaults) and the
seed. The setting stresses the losses the way the SAPO paper does: `algorithm.mini_batches=4` (four updates per
rollout batch, so three of them are off-policy) and twice the demo's learning rate. Reported per loss: the
held-out greedy accuracy per task family after training (mean and spread over seeds), the number of collapse events
(the smoothed training reward falling below half of its best so far), and the reward curves side by side.

Runs go two at a time (`--jobs`), each a `vlm-sapo train` subprocess on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_sapo import demo  # noqa: E402
from vlm_sapo.demo import report as demo_report  # noqa: E402
from vlm_sapo.metrics_log import read_metrics  # noqa: E402

SMOOTH = 5  # steps in the moving average that collapse detection reads


def collapse_events(rewards: list[float], window: int = SMOOTH) -> int:
    """Times the smoothed reward drops below half of its best so far (re-armed once it climbs back above half)."""
    events, best, down = 0, float("-inf"), False
    for i in range(len(rewards)):
        part = rewards[max(0, i - window + 1) : i + 1]
        r = sum(part) / len(part)
        best = max(best, r)
        if best > 0 and r < 0.5 * best and not down:
            events, down = events + 1, True
        elif r >= 0.5 * best:
            down = False
    return events


def train_command(run_dir: Path, cold: Path, data: Path, loss: str, seed: int, args: argparse.Namespace) -> list[str]:
    cfg = demo.DemoConfig(seed=seed, rl_steps=args.rl_steps)
    over = demo.rl_overrides(run_dir, cold, data, cfg) + [
        f"algorithm.loss={{name: {loss}}}", f"algorithm.mini_batches={args.mini_batches}", f"learner.lr={args.lr}",
        f"logging.dir={run_dir}", "eval.every_steps=0", "logging.progress=false"]
    return [sys.executable, "-m", "vlm_sapo.cli", "train", str(demo.RECIPE), *over]


def run_all(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo.DemoConfig(seed=0)
    image_pixels = demo.image_pixels()
    if args.cold_start:
        cold, data = Path(args.cold_start), Path(args.data)
        paths = demo.split_paths(data)
    else:  # one cold start shared by every run, built exactly as `make demo` builds it
        data, cold = out / "data", out / "cold_start"
        paths = demo.make_data(data, cfg)
        if not (cold / "config.json").exists():
            init = demo.build_model(out / "init", paths, cfg, image_pixels)
            demo.cold_start(init, cold, paths, cfg, image_pixels)
    before = demo.evaluate(cold, paths, image_pixels)

    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    results: dict[str, dict[int, dict]] = {loss: {} for loss in args.losses}
    t0 = time.perf_counter()
    while jobs or running:
        while jobs and len(running) < args.jobs:
            loss, seed = jobs.pop(0)
            run_dir = out / "runs" / f"{loss}-seed{seed}"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process below)
            proc = subprocess.Popen(train_command(run_dir, cold, data, loss, seed, args), cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((loss, seed, proc, time.perf_counter()))
            log.close()  # the child holds its own descriptor
        time.sleep(2)
        for item in list(running):
            loss, seed, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            run_dir = out / "runs" / f"{loss}-seed{seed}"
            if proc.returncode != 0:
                raise SystemExit(f"{loss} seed {seed} failed (exit {proc.returncode}); see {run_dir.with_suffix('.log')}")
            rows = read_metrics(run_dir)
            rewards = [r["reward/overall"] for r in rows if "reward/overall" in r]
            after = demo.evaluate(run_dir / "hf", paths, image_pixels)
            results[loss][seed] = {"rewards": rewards, "test": after, "collapses": collapse_events(rewards),
                                   "seconds": time.perf_counter() - started}
            print(f"[{time.perf_counter() - t0:5.0f} s] {loss} seed {seed}: {demo.format_accuracies(after)}, "
                  f"collapses {results[loss][seed]['collapses']}", flush=True)
    return {"before": before, "results": results, "settings": vars(args)}


def table(summary: dict) -> str:
    families = demo.FAMILIES
    head = "| loss | " + " | ".join(f"{f} accuracy (%)" for f in families) + " | collapse events | runs |"
    lines = [head, "|" + " --- |" * (len(families) + 3)]
    before = summary["before"]
    lines.append("| cold start | " + " | ".join(f"{100 * before[f'{f}/accuracy']:.1f}" for f in families)
                 + " | - | - |")
    for loss, by_seed in summary["results"].items():
        cells = []
        for f in families:
            vals = [100 * r["test"][f"{f}/accuracy"] for r in by_seed.values()]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {spread:.1f}")
        collapses = sum(r["collapses"] for r in by_seed.values())
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {collapses} | {len(by_seed)} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(summary["results"])
    fig, axes = plt.subplots(1, len(losses), figsize=(3.2 * len(losses), 3), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for seed, r in sorted(summary["results"][loss].items()):
            ax.plot(range(1, len(r["rewards"]) + 1), demo_report.moving_mean(r["rewards"], SMOOTH), label=f"seed {seed}")
        ax.set(title=loss, xlabel="RL step")
    axes[0][0].set_ylabel(f"training reward ({SMOOTH}-step mean)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare_losses")
    p.add_argument("--losses", nargs="+", default=["sapo", "gspo", "grpo", "dapo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="twice the demo's: on-policy, the demo's policy "
                   "collapsed at this rate within about 100 steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--cold-start", help="reuse a cold-start checkpoint (e.g. runs/demo/cold_start); needs --data")
    p.add_argument("--data", help="the synthetic data folder the cold start was made from (e.g. runs/demo/data)")
    args = p.parse_args(argv)
    if bool(args.cold_start) != bool(args.data):
        p.error("--cold-start and --data go together")
    summary = run_all(args)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    plot(summary, out / "curves.png")
    text = table(summary)
    (out / "table.md").write_text(text + "\n")
    print("\n" + text + f"\n\ncurves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
