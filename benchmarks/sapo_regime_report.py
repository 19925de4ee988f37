"""Renders benchmarks/sapo_regime.py's results JSON into markdown tables and a curves PNG.

    .venv/bin/python benchmarks/sapo_regime_report.py benchmarks/results/sapo_regime.json

Kept apart from the experiment so the write-up can be re-rendered from a finished run without re-running it; every
number it prints comes from the JSON (mean [min, max] over seeds per arm).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# The fields every run reports (tests/demo/test_sapo_regime.py checks they are present and finite); per loss kind
# the ones that exist for it (a clip fraction has no meaning for SAPO, a gate weight none for GRPO).
COMMON_FIELDS = ("instability_step", "stable", "acc_cold", "acc_peak", "acc_final", "reward_first", "reward_last",
                 "entropy_first", "entropy_last", "grad_norm_mean", "ratio_p50", "ratio_p99", "ratio_max", "var_p50",
                 "var_p90", "var_max", "var_p50_worst", "mb0_ratio_p50", "mb0_ratio_p99", "mb0_ratio_max")
CLIP_FIELDS = ("clip_frac_pos", "clip_frac_neg")
SAPO_FIELDS = tuple(f"{q}_{s}_{p}" for s in ("pos", "neg") for q, ps in (("w", ("p1", "p50", "max")),
                                                                          ("c", ("p50", "p99", "max"))) for p in ps)
SAPO_FIELDS += ("bound_p50", "bound_p90", "bound_max")


def fields_for(loss_name: str) -> tuple[str, ...]:
    return COMMON_FIELDS + (SAPO_FIELDS if loss_name == "sapo" else CLIP_FIELDS)


def _cell(v: list[float], fmt: str = "{:.1f}") -> str:
    mean, lo, hi = v
    if not math.isfinite(mean):
        return "-"
    if lo == hi:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _label(spec: dict[str, Any]) -> str:
    loss = spec["loss"]["name"] + ("+" + spec["replay"].upper() if spec["replay"] != "none" else "")
    if "tau_neg" in spec["loss"] and spec["loss"]["tau_neg"] != 1.05:
        loss += f" (tau_neg {spec['loss']['tau_neg']})"
    return loss


def tables(data: dict[str, Any]) -> str:
    summ, arms = data["summary"], {a["name"]: a for a in data["arms"]}
    runs = data["per_run"]
    lines = []
    ctl = data["controls"]
    lines.append("Controls (held-out test, %, mean [min, max] over seeds): blind = best constant answer, shuffled = "
                 "the cold start shown other rows' images, cold start = the trainer's greedy validation at step 0.\n")
    lines.append("| policy | blind math / chart / grounding | shuffled (cold start), mean of families | cold start, "
                 "mean of families |")
    lines.append("| --- | --- | --- | --- |")
    for pol in sorted({a["policy"] for a in arms.values()}):
        c = [v for k, v in ctl.items() if k.startswith(pol + "-")]
        if not c:
            continue
        blind = " / ".join(f"{100 * c[0]['blind'][f]:.1f}" for f in ("math", "chart", "grounding"))
        sh = [100 * sum(x["shuffled"].values()) / 3 for x in c]
        co = [100 * x["cold_acc"]["mean"] for x in c]
        lines.append(f"| {pol} | {blind} | {_cell([sum(sh) / len(sh), min(sh), max(sh)])} | "
                     f"{_cell([sum(co) / len(co), min(co), max(co)])} |")
    lines.append("")
    lines.append("| group | policy | loss | K | lr | stable runs | instability step | held-out peak | held-out final "
                 "| change vs cold | reward step 1 -> last | entropy last / first | grad norm |")
    lines.append("|" + " --- |" * 13)
    for name, spec in arms.items():
        if name not in summ:
            continue
        s = summ[name]
        n = len(runs[name])
        lr = data["lrs"][spec["policy"]][spec["lr"]]
        change = [r["acc_final"] - r["acc_cold"] for r in runs[name]]
        ent = [r["entropy_last"] / r["entropy_first"] for r in runs[name]]
        steps = [r["instability_step"] for r in runs[name] if math.isfinite(r["instability_step"])]
        inst = "never" if not steps else (f"{len(steps)}/{n} at " + ", ".join(str(int(x)) for x in sorted(steps)))
        lines.append(
            f"| {spec['group']} | {spec['policy']} | {_label(spec)} | {spec['k']} | {lr:.0e} | "
            f"{int(sum(r['stable'] for r in runs[name]))}/{n} | {inst} | {_cell(s['acc_peak'])} | "
            f"{_cell(s['acc_final'])} | {_cell([sum(change) / n, min(change), max(change)], '{:+.1f}')} | "
            f"{_cell(s['reward_first'], '{:.3f}')} -> {_cell(s['reward_last'], '{:.3f}')} | "
            f"{_cell([sum(ent) / n, min(ent), max(ent)], '{:.2f}')} | {_cell(s['grad_norm_mean'], '{:.3f}')} |")
    lines.append("")
    lines.append("Off-policy regime per arm (per update, then the median over a run's updates; `_max`: the largest "
                 "over the run), mean [min, max] over seeds. Var_i = Var(log r) per sequence; bound = (tau^2/4) Var_i; "
                 "clip fractions per advantage sign (GRPO: tokens, GSPO: sequences); w = 4p(1-p), c = w r.\n")
    lines.append("| arm | Var_i p50 | Var_i p50, worst update | Var_i max | bound p50 / max | clip A>0 | clip A<0 | "
                 "w A>0 p1 / p50 | w A<0 p1 / p50 | c A>0 p50 / p99 / max | c A<0 p50 / p99 / max |")
    lines.append("|" + " --- |" * 11)
    g = "{:.3g}"
    for name, spec in arms.items():
        if name not in summ:
            continue
        s = summ[name]

        def cells(*keys: str, s: dict = s) -> str:
            return " / ".join(_cell(s[k], g) if k in s else "-" for k in keys)

        lines.append(f"| {spec['policy']} {_label(spec)} K={spec['k']} {spec['lr']} | {cells('var_p50')} | "
                     f"{cells('var_p50_worst')} | {cells('var_max')} | {cells('bound_p50', 'bound_max')} | "
                     f"{cells('clip_frac_pos')} | {cells('clip_frac_neg')} | {cells('w_pos_p1', 'w_pos_p50')} | "
                     f"{cells('w_neg_p1', 'w_neg_p50')} | {cells('c_pos_p50', 'c_pos_p99', 'c_pos_max')} | "
                     f"{cells('c_neg_p50', 'c_neg_p99', 'c_neg_max')} |")
    lines.append("")
    kmax = max(a["k"] for a in arms.values())
    lines.append("Token ratio r per mini-batch index j (update j + 1 of each rollout batch; median over steps of the "
                 "per-update p50 / p99, and the largest max), seed means:\n")
    lines.append("| arm | " + " | ".join(f"j={j}" for j in range(kmax)) + " |")
    lines.append("|" + " --- |" * (kmax + 1))
    for name, spec in arms.items():
        if name not in summ:
            continue
        s = summ[name]
        row = []
        for j in range(kmax):
            if f"mb{j}_ratio_p50" in s:
                row.append(f"{s[f'mb{j}_ratio_p50'][0]:.4f} / {s[f'mb{j}_ratio_p99'][0]:.3f} / "
                           f"{s[f'mb{j}_ratio_max'][0]:.2f}")
            else:
                row.append("")
        lines.append(f"| {spec['policy']} {_label(spec)} K={spec['k']} {spec['lr']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {a["name"]: a for a in data["arms"]}
    by_arm: dict[str, list[dict]] = {}
    for r in data["runs"]:
        by_arm.setdefault(r["arm"], []).append(r)

    def mean_curve(name: str, key: str) -> list[float]:
        runs = by_arm.get(name, [])
        n = min((len(r["rows"]) for r in runs), default=0)
        return [sum(r["rows"][i][key] for r in runs) / len(runs) for i in range(n)]

    colors = {"sapo": "C0", "gspo": "C1", "grpo": "C2"}
    panels = [("core, dense, K = 4", lambda a: a["group"] == "core" and a["policy"] == "dense"),
              ("core, MoE, K = 4", lambda a: a["group"] == "core" and a["policy"] == "moe"),
              ("K sweep, MoE", lambda a: a["group"] == "k" or (a["group"] == "core" and a["policy"] == "moe"
                                                               and a["replay"] == "none")),
              ("drift (8x lr), MoE, K = 4", lambda a: a["group"] == "drift"),
              ("tau_neg ablation, MoE, K = 4", lambda a: a["group"] == "ablation" or (
                  a["group"] == "core" and a["policy"] == "moe" and a["loss"]["name"] == "sapo"
                  and a["replay"] == "none"))]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.2), squeeze=False)
    styles = {1: ":", 2: "-.", 4: "-", 8: "--"}
    for col, (title, pick) in enumerate(panels):
        for name, spec in arms.items():
            if name not in by_arm or not pick(spec):
                continue
            label = _label(spec) + (f" K={spec['k']}" if "K sweep" in title else "")
            kw = {"color": colors.get(spec["loss"]["name"], "k"), "linestyle": styles.get(spec["k"], "-")}
            if spec["replay"] != "none" or "tau_neg" in title:
                kw = {"linestyle": "-" if spec["replay"] == "none" else "--"}
            rew = mean_curve(name, "reward")
            axes[0][col].plot(range(1, len(rew) + 1), rew, label=label, **kw)
            ent = mean_curve(name, "entropy")
            axes[1][col].plot(range(1, len(ent) + 1), ent, label=label, **kw)
        axes[0][col].set_title(title, fontsize="medium")
        axes[1][col].set_xlabel("RL step")
        if axes[0][col].lines:
            axes[0][col].legend(fontsize="x-small")
    axes[0][0].set_ylabel("training reward (seed mean)")
    axes[1][0].set_ylabel("entropy (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results: Path, out_dir: Path) -> str:
    data = json.loads(Path(results).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    text = tables(data)
    (out_dir / "sapo_regime.md").write_text(text + "\n")
    plot(data, out_dir / "sapo_regime.png")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="benchmarks/results/sapo_regime.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    print(render(Path(args.results), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
