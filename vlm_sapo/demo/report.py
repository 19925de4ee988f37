"""The demo's report: tables with their controls, training curves, example grids and answer histograms.

Every accuracy stands beside its two controls, the blind baseline (the best constant answer) and the image-shuffled
score (the policy shown another row's image); a gain counts only above both (`GAIN`, `MARGIN`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from vlm_sapo.data.sample import IMAGE_PLACEHOLDER

FAMILIES = ("math", "chart", "grounding")
GAIN = 10.0  # points over the cold start that count as RL teaching something
MARGIN = 15.0  # points above the blind baseline and the image-shuffled score


def passes(f: dict[str, float]) -> bool:
    return (f["after"] - f["cold_start"] >= GAIN and f["after"] - f["blind"] >= MARGIN
            and f["after"] - f["shuffled"] >= MARGIN)


def results_table(result: dict[str, Any]) -> str:
    lines = ["| task | blind | shuffled image | cold start | after SAPO | change | top answer after | gain counts |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for family, f in result["families"].items():
        lines.append(f"| {family} | {f['blind']:.1f} | {f['shuffled']:.1f} | {f['cold_start']:.1f} | {f['after']:.1f} "
                     f"| {f['after'] - f['cold_start']:+.1f} | {f['top_answer_share_after']:.0f}% "
                     f"| {'yes' if passes(f) else 'no'} |")
    return "\n".join(lines)


def seeds_table(results: list[dict[str, Any]]) -> str:
    """Per family, mean [min, max] over seeds of each number, and how many seeds pass the gain criteria."""
    keys = ("blind", "shuffled", "cold_start", "after")
    lines = ["| task | blind | shuffled image | cold start | after SAPO | change | seeds passing |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def spread(values: list[float]) -> str:
        return f"{sum(values) / len(values):.1f} [{min(values):.1f}, {max(values):.1f}]"

    for family in FAMILIES:
        fs = [r["families"][family] for r in results]
        cols = [spread([f[k] for f in fs]) for k in keys]
        cols.append(spread([f["after"] - f["cold_start"] for f in fs]))
        lines.append(f"| {family} | " + " | ".join(cols) + f" | {sum(passes(f) for f in fs)}/{len(fs)} |")
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines.append(f"\nmean [min, max] over seeds {seeds}; wall time per seed "
                 f"{min(r['wall_s'] for r in results):.0f}-{max(r['wall_s'] for r in results):.0f} s")
    return "\n".join(lines)


def moving_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_path: Path, result: dict[str, Any], report: Path) -> list[Path]:
    """Training reward per family, and validation accuracy with the test accuracy before and after."""
    from vlm_sapo.metrics_log import read_metrics

    plt = _plt()
    rows = read_metrics(metrics_path.parent)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for family in FAMILIES:
        pts = [(r["step"], r[f"reward/{family}/overall"]) for r in rows if f"reward/{family}/overall" in r]
        if pts:
            steps, vals = zip(*pts)
            axes[0].plot(steps, moving_mean(list(vals), 9), label=family)
        top = [(r["step"], 100 * r[f"answers/{family}/top_share"]) for r in rows if f"answers/{family}/top_share" in r]
        if top:
            steps, vals = zip(*top)
            axes[1].plot(steps, moving_mean(list(vals), 9), label=family)
    axes[0].set(xlabel="RL step", ylabel="mean reward of the rollouts (smoothed)", title="Training reward")
    axes[1].set(xlabel="RL step", ylabel="% of rollouts", title="Share of the most common answer (collapse shows here)",
                ylim=(0, 100))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(report / "reward.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    last = rows[-1]["step"] if rows else 0
    for family in FAMILIES:
        key = f"val/{family}/accuracy"
        pts = [(r["step"], 100 * r[key]) for r in rows if key in r]
        f = result["families"][family]
        line, = ax.plot(*zip(*pts), marker="o", label=f"{family} (validation)") if pts else ax.plot([], [])
        ax.scatter([0, last], [f["cold_start"], f["after"]], marker="s", color=line.get_color())
        ax.axhline(max(f["blind"], f["shuffled"]), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlabel="RL step", ylabel="greedy accuracy (%)", ylim=(0, 100),
           title="Accuracy (squares: test; dotted: best control)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "accuracy.png", dpi=110)
    plt.close(fig)
    return [report / "reward.png", report / "accuracy.png"]


def _answer_text(text: str) -> str:
    return text.split("<answer>")[-1].split("</answer>")[0] if "<answer>" in text else text[:20]


def example_grid(family: str, samples: list[Any], before: dict[str, dict], after: dict[str, dict], path: Path,
                 count: int = 16) -> Path:
    """Test images of one family with the gold answer and the greedy answers before and after RL (green: right);
    grounding draws the boxes (gold black, before orange, after blue)."""
    from matplotlib.patches import Rectangle

    from rewards.grounding import parse_box

    plt = _plt()
    rows = samples[:count]
    cols = 4
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(3.0 * cols, 3.3 * len(rows) / cols))
    for ax, s in zip(axes.flat, rows):
        ax.imshow(s.load_images()[0], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        b, a = before[s.id], after[s.id]
        if family == "grounding":
            for rec, colour in ((None, "black"), (b, "orange"), (a, "tab:blue")):
                box = s.answer if rec is None else parse_box(rec["completion"])
                if box is not None:
                    ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                           edgecolor=colour, linewidth=2 if rec is None else 1.5))
        gold = json.dumps(s.answer) if family == "grounding" else str(s.answer)
        ax.set_title(f"{s.question.replace(IMAGE_PLACEHOLDER, '').strip()[:28]}\ngold {gold}", fontsize=7)
        ax.set_xlabel(f"before {_answer_text(b['completion'])}  |  after {_answer_text(a['completion'])}", fontsize=7,
                      color="green" if a["accuracy"] >= 1 else "red")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{family}: test images, greedy answers before and after SAPO (label green when right after)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def answer_histograms(samples: list[Any], before: dict[str, dict], after: dict[str, dict], path: Path) -> Path:
    """Per family, how often each answer is given on the test split: gold, cold start, after RL."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(5 * len(FAMILIES), 3.6))
    for ax, family in zip(axes, FAMILIES):
        rows = [s for s in samples if s.task == family]
        gold = Counter(json.dumps(s.answer) if family == "grounding" else str(s.answer) for s in rows)
        got_b = Counter(_answer_text(before[s.id]["completion"]) for s in rows)
        got_a = Counter(_answer_text(after[s.id]["completion"]) for s in rows)
        labels = sorted(set(gold) | set(got_b.most_common(8) and dict(got_b.most_common(8)))
                        | set(dict(got_a.most_common(8))))
        x = np.arange(len(labels))
        for k, (name, counts) in enumerate((("gold", gold), ("cold start", got_b), ("after SAPO", got_a))):
            ax.bar(x + (k - 1) * 0.27, [counts.get(lab, 0) for lab in labels], 0.27, label=name)
        ax.set_xticks(x, labels, rotation=60 if family == "grounding" else 0, fontsize=6 if family == "grounding" else 8,
                      ha="right" if family == "grounding" else "center")
        ax.set(title=f"{family} answers (test split, {len(rows)} rows)", ylabel="rows")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(report: Path, result: dict[str, Any], config: dict[str, Any]) -> Path:
    t = result["timings"]
    cold = result["cold_start_training"]
    ok = [f for f, v in result["families"].items() if passes(v)]
    text = f"""# vlm_sapo CPU demo (seed {result['seed']})

Held-out test split ({config['n_test']} rows per task, answers balanced), greedy decoding, scored by the tasks' own
rewards. Accuracy in %. *blind*: the best constant answer; *shuffled image*: the policy after SAPO, each row shown
another row's image. A gain counts when it is at least {GAIN:.0f} points over the cold start and {MARGIN:.0f} points
above both controls.

{results_table(result)}

Families whose gain counts: {', '.join(ok) or 'none'}.

- cold start: {cold['steps']} supervised steps, loss {cold['loss_first']:.2f} -> {cold['loss_last']:.2f}
- RL: {config['rl_steps']} SAPO steps (`vlm_sapo/demo/demo_cpu.yaml`)
- wall time: {result['wall_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in t.items())})

![reward](reward.png) ![accuracy](accuracy.png)

![answers](answers.png)

{chr(10).join(f'![{f}]({f}_examples.png)' for f in FAMILIES)}

Config: `{json.dumps(config)}`
"""
    path = report / "summary.md"
    path.write_text(text)
    return path
