"""SAPO vs GSPO vs GRPO in the SAPO paper's regime: ratios near 1, K mini-batch updates per rollout batch, 5 seeds.

    .venv/bin/python benchmarks/sapo_regime.py                    # the full fractional plan (about 45 min, 2 cores)
    .venv/bin/python benchmarks/sapo_regime.py --quick            # the machinery: 2 arms, 1 seed, 3 steps

Why this exists: benchmarks/compare_losses.py ran every loss at lr 1e-3 with 4 updates per batch, where token ratios
reach 3.5 and SAPO's gate (c = w r near 1 there) barely brakes: far off the paper's regime (lr 1e-6 on 30B models,
Var_i = Var(log r) small). Here the learning rate is *calibrated*: the largest of a few candidates for which SAPO at
K = 4 keeps the median per-sequence Var_i below 0.02 on every update; one drift arm runs at 8x that rate.

Policies: the demo's dense Qwen2.5-VL and its Qwen3-VL-MoE twin (`--family qwen3_vl_moe`), each with the demo's cold
start (one per policy per seed, cached under <out>/cold, shared by every arm). A full factorial (2 policies x 4 K x
3 lrs x 9 losses x 5 seeds) does not fit 2 cores; the fractional plan (`plan()`):
  core      K = 4, calibrated lr: sapo, gspo, grpo on both policies; grpo+R2, grpo+R3, sapo+R3 on MoE
  K sweep   MoE, calibrated lr, K = 1, 2, 8 (K = 4 is the core arm): sapo, gspo, grpo
  drift     MoE, K = 4, 8x the calibrated lr: sapo, gspo, grpo
  ablation  MoE, K = 4, calibrated lr: sapo tau_neg 0.95, 1.0 (1.05 is the core arm), Fig. 5 of the paper
Every run is the real Trainer (transformers rollouts, DeepSpeed learner) driven step by step in a worker process;
held-out greedy accuracy is the trainer's own validation (temperature 0) on the 200-row test split of each family.
K = 1 is the control: on-policy r = 1 exactly and every loss has the gradient A grad(log pi), so on a policy and seed
every K = 1 arm's first step (its reward and gradient norm) must be identical; the script asserts it.
The regime metrics come from the losses themselves (`vlm_sapo.algos.losses.observe_policy_losses`,
`regime_metrics`), one record per update, so quantiles are per mini-batch index.

Instability (first step at which any holds; "never" otherwise): the 3-step mean training reward below half of the
mean of steps 1-3; the entropy below a quarter of step 1's; the mean held-out accuracy 10 points below the cold start.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_sapo import demo  # noqa: E402

POLICIES = {"dense": "qwen2_5_vl", "moe": "qwen3_vl_moe"}
LOSSES = {  # each loss with the hyper-parameters the issue names
    "sapo": {"name": "sapo", "tau_pos": 1.0, "tau_neg": 1.05},
    "gspo": {"name": "gspo", "clip_low": 3e-4, "clip_high": 4e-4},
    "grpo": {"name": "grpo", "clip_low": 0.2, "clip_high": 0.27},
}
VAR_TARGET = 0.02  # median Var_i at K = 4 under the calibrated lr
DRIFT_FACTOR = 8.0
ACC_DROP = 0.10  # instability: mean held-out accuracy this far below the cold start
CAL_LRS = (1e-3, 3e-4, 1e-4)


def arm(group: str, policy: str, loss: str, k: int, lr: str = "cal", replay: str = "none",
        **hparams: float) -> dict[str, Any]:
    tag = "".join(f"-{key}{v}" for key, v in hparams.items())
    name = f"{policy}-{loss}{'+' + replay.upper() if replay != 'none' else ''}{tag}-K{k}-{lr}"
    return {"name": name, "group": group, "policy": policy, "loss": {**LOSSES[loss], **hparams}, "k": k, "lr": lr,
            "replay": replay}


def plan(quick: bool = False) -> list[dict[str, Any]]:
    """The fractional design (see the module docstring); `quick`: two K = 1 arms, the identity check's smallest case."""
    if quick:
        return [arm("k", "moe", "sapo", 1), arm("k", "moe", "grpo", 1)]
    arms = [arm("core", p, loss, 4) for p in ("dense", "moe") for loss in ("sapo", "gspo", "grpo")]
    arms += [arm("core", "moe", "grpo", 4, replay="r2"), arm("core", "moe", "grpo", 4, replay="r3"),
             arm("core", "moe", "sapo", 4, replay="r3")]
    arms += [arm("k", "moe", loss, k) for k in (1, 2, 8) for loss in ("sapo", "gspo", "grpo")]
    arms += [arm("drift", "moe", loss, 4, lr="drift") for loss in ("sapo", "gspo", "grpo")]
    arms += [arm("ablation", "moe", "sapo", 4, tau_neg=t) for t in (0.95, 1.0)]
    return arms


# ------------------------------------------------------------------------------------------------ cold starts
def prepare_cold(out: Path, policy: str, seed: int, sft_steps: int) -> dict[str, Any]:
    """Data, the demo's cold start, the blind baseline and the cold start's image-shuffled control; cached on disk."""
    import torch

    torch.set_num_threads(1)
    cfg = demo.DemoConfig(seed=seed, family=POLICIES[policy], sft_steps=sft_steps)
    data = out / "data" / f"seed{seed}"
    cold = out / "cold" / f"{policy}-seed{seed}"
    info_path = cold / "controls.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    paths = demo.split_paths(data)  # written by main() before the workers start (two policies share it)
    pixels = demo.image_pixels(cfg.family)
    t0 = time.perf_counter()
    init = demo.build_model(out / "init" / f"{policy}-seed{seed}", paths, cfg, pixels)
    demo.cold_start(init, cold, paths, cfg, pixels)
    blind = demo.blind_baseline(paths)
    shuffled = demo.evaluate(cold, paths, pixels, family=cfg.family, shuffle_seed=seed)
    info = {"blind": {f: blind[f]["accuracy"] for f in demo.FAMILIES},
            "shuffled": {f: shuffled[f"{f}/accuracy"] for f in demo.FAMILIES}, "seconds": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


# ------------------------------------------------------------------------------------------------ one run
def _overrides(out: Path, spec: dict[str, Any], seed: int, lr: float, steps: int, run_dir: Path) -> list[str]:
    policy = spec["policy"]
    cfg = demo.DemoConfig(seed=seed, family=POLICIES[policy], rl_steps=steps)
    data = out / "data" / f"seed{seed}"
    over = demo.rl_overrides(run_dir, out / "cold" / f"{policy}-seed{seed}", data, cfg)
    over += [f"data.val.{i}.path={data / f / 'test.jsonl'}" for i, f in enumerate(demo.FAMILIES)]  # held-out test
    loss = ", ".join(f"{k}: {v}" for k, v in spec["loss"].items())
    over += [f"algorithm.loss={{{loss}}}", f"algorithm.mini_batches={spec['k']}", f"learner.lr={lr}",
             f"algorithm.routing_replay={spec['replay']}", f"logging.dir={run_dir}", "logging.progress=false",
             "eval.every_steps=0", "eval.at_end=false", "checkpoint.export_hf=false"]
    return over


def _accuracy(val: dict[str, float]) -> dict[str, float]:
    from vlm_sapo.tasks import get_task

    acc = {f: val[f"val/{f}/{get_task(f).metric}"] for f in demo.FAMILIES}
    acc["mean"] = sum(acc.values()) / len(demo.FAMILIES)
    return acc


def run_one(out: str, spec: dict[str, Any], seed: int, lr: float, steps: int, eval_every: int,
            eval_at_start: bool = False) -> dict[str, Any]:
    """One arm and seed: the real Trainer, stepped here so every update's loss tensors are observed."""
    import torch

    from vlm_sapo.algos import observe_policy_losses, regime_metrics
    from vlm_sapo.recipe import load_recipe
    from vlm_sapo.trainer import Trainer

    torch.set_num_threads(1)
    out_p = Path(out)
    run_dir = out_p / "runs" / f"{spec['name']}-seed{seed}" if steps else out_p / "runs" / f"eval-{spec['policy']}-seed{seed}"
    cache = run_dir / "result.json"  # a finished run is kept: a re-run (e.g. with fewer seeds) reuses it
    key = {"spec": spec, "lr": lr, "steps": steps, "eval_every": eval_every, "eval_at_start": eval_at_start}
    if cache.exists() and json.loads(cache.read_text()).get("key") == json.loads(json.dumps(key)):
        return json.loads(cache.read_text())
    recipe = load_recipe(demo.RECIPE, _overrides(out_p, spec, seed, lr, max(steps, 1), run_dir))
    records: list[dict[str, float]] = []

    def observe(name: str, tensors: dict) -> None:
        if not bool(tensors["grad"]):  # the learner's whole-batch metrics call: one per update
            records.append(regime_metrics(name, tensors))

    t0 = time.perf_counter()
    trainer = Trainer(recipe)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"arm": spec["name"], "seed": seed, "lr": lr}
    try:
        if eval_at_start:
            result["eval0"] = _accuracy(trainer.validate())
        with observe_policy_losses(observe):
            for step in range(1, steps + 1):
                n0 = len(records)
                metrics, _ = trainer.train_step()
                trainer.step += 1
                row = {"step": step, "reward": metrics.get("reward/overall", float("nan")),
                       "entropy": metrics.get("train/entropy", float("nan")),
                       "grad_norm": metrics.get("train/grad_norm", float("nan")),
                       "skipped": metrics.get("batch/skipped_no_signal", 0.0), "updates": records[n0:]}
                if step % eval_every == 0 or step == steps:
                    row["eval"] = _accuracy(trainer.validate())
                rows.append(row)
    finally:
        trainer.close()
    result.update(rows=rows, seconds=time.perf_counter() - t0, key=key)
    cache.write_text(json.dumps(result, default=float) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ analysis
def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def instability_step(rows: list[dict[str, Any]], cold_acc: float) -> int | None:
    """The first step that meets the module docstring's definition of instability, or None."""
    rewards = [r["reward"] for r in rows]
    base = _finite(rewards[:3])
    base_r = sum(base) / len(base) if base else float("nan")
    ent0 = rows[0]["entropy"] if rows else float("nan")
    for i, r in enumerate(rows):
        win = _finite(rewards[max(0, i - 2): i + 1])
        if i >= 2 and base_r > 0 and win and sum(win) / len(win) < 0.5 * base_r:
            return r["step"]
        if math.isfinite(ent0) and ent0 > 0 and r["entropy"] < 0.25 * ent0:
            return r["step"]
        if "eval" in r and r["eval"]["mean"] < cold_acc - ACC_DROP:
            return r["step"]
    return None


def summarize_run(res: dict[str, Any], cold: dict[str, float]) -> dict[str, float]:
    """One run's reported fields (all floats; NaN where a loss has no such quantity, e.g. clip fractions for SAPO)."""
    rows = res["rows"]
    evals = [r["eval"]["mean"] for r in rows if "eval" in r]
    ups = [u for r in rows for u in r["updates"]]
    inst = instability_step(rows, cold["mean"])
    out = {"instability_step": float(inst) if inst is not None else float("nan"),
           "stable": float(inst is None),
           "acc_cold": 100 * cold["mean"], "acc_peak": 100 * max(evals), "acc_final": 100 * evals[-1],
           "reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"],
           "entropy_first": rows[0]["entropy"], "entropy_last": rows[-1]["entropy"],
           "grad_norm_mean": statistics.mean(_finite([r["grad_norm"] for r in rows]) or [float("nan")]),
           "seconds": res["seconds"]}
    for f in demo.FAMILIES:
        out[f"acc_final_{f}"] = 100 * [r["eval"][f] for r in rows if "eval" in r][-1]
    keys = sorted({k for u in ups for k in u})
    for k in keys:  # the median over updates of each per-update quantile; the max of maxima
        vals = _finite([u.get(k, float("nan")) for u in ups])
        if not vals:
            out[k] = float("nan")
        else:
            out[k] = max(vals) if k.endswith("_max") else statistics.median(vals)
    out["var_p50_worst"] = max(_finite([u["var_p50"] for u in ups]) or [float("nan")])
    kmax = max(len(r["updates"]) for r in rows)
    for j in range(kmax):  # r at p50 / p99 / max per mini-batch index (median over steps; max of maxima)
        at = [r["updates"][j] for r in rows if len(r["updates"]) > j]
        out[f"mb{j}_ratio_p50"] = statistics.median(u["ratio_p50"] for u in at)
        out[f"mb{j}_ratio_p99"] = statistics.median(u["ratio_p99"] for u in at)
        out[f"mb{j}_ratio_max"] = max(u["ratio_max"] for u in at)
    return out


def check_k1_identity(results: list[dict[str, Any]], arms: dict[str, dict]) -> tuple[list[str], list[str]]:
    """Every K = 1 arm of a policy and seed takes the same first step: same reward, same gradient norm, r = 1.
    Returns (what was checked, violations); main() writes both and exits 1 on any violation."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for res in results:
        spec = arms[res["arm"]]
        if spec["k"] == 1 and spec["lr"] == "cal":
            groups.setdefault((spec["policy"], res["seed"]), []).append(res)
    checked, bad = [], []
    for (policy, seed), runs in sorted(groups.items()):
        first = [r["rows"][0] for r in runs]
        g0, rw0 = first[0]["grad_norm"], first[0]["reward"]
        for run, r in zip(runs, first):
            if not r["updates"] or any(abs(u["ratio_max"] - 1) > 1e-6 or abs(u["ratio_p50"] - 1) > 1e-6
                                       for u in r["updates"]):
                bad.append(f"{policy} seed {seed}: {run['arm']} step 1 is not on-policy: {r['updates']}")
            if r["reward"] != rw0:
                bad.append(f"{policy} seed {seed}: {run['arm']} sampled other rollouts at step 1")
            if not math.isclose(r["grad_norm"], g0, rel_tol=1e-4):
                bad.append(f"{policy} seed {seed}: {run['arm']} first-update grad norm {r['grad_norm']} != {g0}")
        checked.append(f"{policy} seed {seed}: {len(runs)} losses ({', '.join(r['arm'] for r in runs)}), "
                       f"grad norm {g0:.6g}, reward {rw0:.4f}")
    return checked, bad


def aggregate_arms(summaries: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per arm and field: [mean, min, max] over seeds (NaN-free values only; instability counts stable runs)."""
    out = {}
    for name, runs in summaries.items():
        fields = {}
        for k in sorted({k for r in runs for k in r}):
            vals = _finite([r.get(k, float("nan")) for r in runs])
            fields[k] = [statistics.mean(vals), min(vals), max(vals)] if vals else [float("nan")] * 3
        fields["seeds"] = [float(len(runs))] * 3
        out[name] = fields
    return out


# ------------------------------------------------------------------------------------------------ orchestration
def _pool(jobs: int) -> ProcessPoolExecutor:
    # Long-lived workers: with max_tasks_per_child, Python 3.11's pool hung here once a worker was replaced.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


def calibrate(out: Path, pool: ProcessPoolExecutor, policy: str, steps: int, lrs: tuple[float, ...]) -> dict:
    """SAPO, K = 4, seed 0: the largest candidate lr whose median Var_i stays below VAR_TARGET on every update."""
    spec = arm("cal", policy, "sapo", 4)
    futs = {lr: pool.submit(run_one, str(out), {**spec, "name": f"cal-{policy}-lr{lr}"}, 0, lr, steps, steps)
            for lr in lrs}
    worst = {lr: max(u["var_p50"] for r in f.result()["rows"] for u in r["updates"]) for lr, f in futs.items()}
    ok = [lr for lr in lrs if worst[lr] < VAR_TARGET]
    chosen = max(ok) if ok else min(lrs)
    return {"lr": chosen, "worst_var_p50": {str(k): v for k, v in worst.items()}, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sapo_regime")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--cal-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="skip calibration: this lr for both policies")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=demo.DemoConfig.sft_steps)
    p.add_argument("--results", default="benchmarks/results/sapo_regime.json")
    p.add_argument("--quick", action="store_true", help="2 K = 1 arms on MoE, 1 seed, 3 steps, a short cold start")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.sft_steps = [0], 3, 3, 40
        args.lr = args.lr or 2e-4
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = plan(args.quick)
    by_name = {a["name"]: a for a in arms}
    policies = sorted({a["policy"] for a in arms})
    t_start = time.perf_counter()
    log = print
    for s in args.seeds:
        if not (out / "data" / f"seed{s}" / "grounding" / "test.jsonl").exists():
            demo.make_data(out / "data" / f"seed{s}", demo.DemoConfig(seed=s))
    with _pool(args.jobs) as pool:
        futs = {(pol, s): pool.submit(prepare_cold, out, pol, s, args.sft_steps) for pol in policies for s in args.seeds}
        controls = {k: f.result() for k, f in futs.items()}
        log(f"[{time.perf_counter() - t_start:5.0f} s] cold starts ready", flush=True)
        evs = {k: pool.submit(run_one, str(out), arm("eval", k[0], "sapo", 1), k[1], 1e-4, 0, 1, True)
               for k in controls}
        for k, f in evs.items():
            controls[k]["cold_acc"] = f.result()["eval0"]
        if args.lr is not None:
            cal = {pol: {"lr": args.lr, "given": True} for pol in policies}
        else:
            cal = {pol: calibrate(out, pool, pol, args.cal_steps, CAL_LRS) for pol in policies}
        log(f"[{time.perf_counter() - t_start:5.0f} s] calibrated: {cal}", flush=True)
        lrs = {pol: {"cal": c["lr"], "drift": DRIFT_FACTOR * c["lr"]} for pol, c in cal.items()}
        jobs = [(a, s) for s in args.seeds for a in arms]
        futs2 = [(a, s, pool.submit(run_one, str(out), a, s, lrs[a["policy"]][a["lr"]], args.steps, args.eval_every))
                 for a, s in jobs]
        results, failed = [], []
        for a, s, f in futs2:
            try:
                res = f.result()
            except Exception as e:  # a crashed run is reported, never silently dropped
                failed.append(f"{a['name']} seed {s}: {type(e).__name__}: {e}")
                log(f"FAILED {failed[-1]}", flush=True)
                continue
            results.append(res)
            log(f"[{time.perf_counter() - t_start:5.0f} s] {a['name']} seed {s}: reward "
                f"{res['rows'][0]['reward']:.3f} -> {res['rows'][-1]['reward']:.3f}, held-out "
                f"{100 * res['rows'][-1]['eval']['mean']:.1f}% ({res['seconds']:.0f} s)", flush=True)
    identity, violations = check_k1_identity(results, by_name)
    summaries: dict[str, list[dict[str, float]]] = {}
    for res in results:
        spec = by_name[res["arm"]]
        ctl = controls[(spec["policy"], res["seed"])]
        summaries.setdefault(res["arm"], []).append(summarize_run(res, ctl["cold_acc"]))
    wall = time.perf_counter() - t_start
    payload = {"settings": {**vars(args), "var_target": VAR_TARGET, "drift_factor": DRIFT_FACTOR,
                            "acc_drop": ACC_DROP, "cal_lrs": CAL_LRS},
               "wall_s": wall, "calibration": cal, "lrs": lrs, "arms": arms, "k1_identity": identity,
               "k1_violations": violations, "failed_runs": failed,
               "controls": {f"{k[0]}-seed{k[1]}": v for k, v in controls.items()},
               "per_run": summaries, "summary": aggregate_arms(summaries), "runs": results}
    res_path = Path(args.results) if not args.quick else out / "sapo_regime.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float) + "\n")
    log("K = 1 identity:\n  " + "\n  ".join(identity))
    log(f"wall time {wall:.0f} s; results: {res_path}")
    if violations or failed:
        log("PROBLEMS:\n  " + "\n  ".join(violations + failed))
        return 1
    from sapo_regime_report import render  # benchmarks/ is on sys.path as this script's folder

    render(res_path, Path("benchmarks/results") if not args.quick else out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
