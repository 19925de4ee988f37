"""The CPU demo: a tiny VLM learns synthetic visual tasks with SAPO, in minutes, on two cores.

    python -m vlm_sapo.demo            (what `make demo` runs; about 4 minutes on 2 CPU cores)
    python -m vlm_sapo.demo --seeds 0 1 2 3 4 --out runs/demo5     (the five-seed table in README)
    python -m vlm_sapo.demo --family qwen3_vl_moe              (the same on a tiny Qwen3-VL-MoE, 4 experts, top-2)

1. data: synthetic math (how many shapes in a 3 x 3 grid), chart (the largest value of a bar chart) and grounding
   (the box of a described shape beside a distractor, in a 2 x 2 grid of shaded cells), answers balanced in every
   split, disjoint by scene;
2. model: a tiny random Qwen2.5-VL (0.7 M parameters) with a byte-level BPE of a few hundred tokens trained on the
   task text, so one RL step takes a fraction of a second instead of seconds;
3. cold start: a short supervised warm-up on gold answers, so the policy follows the answer format and is right
   sometimes, far from always (RL needs groups whose rewards differ);
4. RL: `vlm-sapo train vlm_sapo/demo/demo_cpu.yaml` (package data beside this file) with the transformers
   rollout backend, the SAPO loss, G = 8;
5. evaluation: greedy accuracy on the held-out test split, before and after RL, per task family, beside the blind
   baseline (best constant answer) and the image-shuffled score; a report folder (`runs/demo/report/`, see
   `vlm_sapo/demo/report.py`).

Why it is shaped this way (measured on this CPU, see README "The demo"): the earlier unbalanced tasks let a blind
policy score 30-58% with one constant answer, and RL on a blind cold start collapsed onto it; a Qwen-VL vision token
says what is in its 28 pixels but not where, so grounding cells are shaded; a random, frozen vision tower's features
already tell every cell's colour apart, so it stays frozen and each 28-pixel cell is exactly one image token; rows
carry a short instruction, so that the prompt is mostly image. RL at a learning rate of 1e-3 or above collapsed the
policy's entropy within 100 steps; 5e-4 for 120 steps does not. It demonstrates the machinery learning from rewards,
not a capable model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# The demo recipe is package data (pyproject.toml), read through importlib.resources, so that a non-editable install
# (`pip install .`) runs the demo from any folder; a filesystem path, since recipes `base:` others beside them.
RECIPE = Path(str(resources.files(__package__).joinpath("demo_cpu.yaml")))
FAMILIES = ("math", "chart", "grounding")
MODEL_FAMILY = "qwen2_5_vl"

log = logging.getLogger("vlm_sapo.demo")


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo (measured on 2 CPU cores; see benchmarks/RESULTS.md)."""

    seed: int = 0
    family: str = MODEL_FAMILY  # the policy's model family (`vlm_sapo.models.tiny.FAMILIES`)
    n_train: int = 700  # rows per family (grounding has 108 distinct scenes per answer box)
    n_val: int = 48
    n_test: int = 200
    vocab_size: int = 400
    hidden_size: int = 128
    layers: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    sft_rows: int = 600  # rows per family seen by the cold start
    sft_steps: int = 400
    sft_grounding_repeats: int = 3  # grounding rows appear 3 times per cold-start epoch: it is learnt slowest
    sft_batch: int = 32
    sft_lr: float = 3e-3
    rl_steps: int = 120
    threads: int = 1


# ------------------------------------------------------------------------------------------------------- the stages
def image_pixels(family: str = MODEL_FAMILY) -> tuple[int, int]:
    """The processor's smallest and largest pixel budget: one image token per 28-pixel grid cell. For Qwen2/2.5-VL
    (28-pixel tokens) those are the synthetic images themselves, never resized; Qwen3-VL's 32-pixel tokens take them
    scaled by 32/28, so that the cell borders still fall on token borders."""
    from vlm_sapo.demo.synthetic import SyntheticConfig
    from vlm_sapo.models.tiny import image_token_pixels

    sides = [SyntheticConfig().side(f) // 28 * image_token_pixels(family) for f in FAMILIES]
    return min(sides) ** 2, max(sides) ** 2


def split_paths(data_dir: Path) -> dict[str, dict[str, Path]]:
    return {f: {s: Path(data_dir) / f / f"{s}.jsonl" for s in ("train", "val", "test")} for f in FAMILIES}


def make_data(out: Path, cfg: DemoConfig) -> dict[str, dict[str, Path]]:
    from vlm_sapo.demo.synthetic import make_synthetic_data

    return make_synthetic_data(out, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)


def tokenizer_corpus(paths: dict[str, dict[str, Path]], family: str = MODEL_FAMILY) -> list[str]:
    """What the model will read and write: every train question with its task instruction and gold completion."""
    from vlm_sapo.data import Sample
    from vlm_sapo.data.sample import IMAGE_PLACEHOLDER
    from vlm_sapo.demo.synthetic import gold_completion
    from vlm_sapo.tasks import coord_system_for_family, get_task

    coords = coord_system_for_family(family)
    texts = []
    for family, splits in paths.items():
        for line in splits["train"].read_text().splitlines():
            row = json.loads(line)
            s = Sample(row["id"], family, [], row["question"], row["answer"], {**row, "coord_system": coords})
            question = s.question.replace(IMAGE_PLACEHOLDER, "").strip()  # the image's tokens are not text
            texts.append(f"{question}\n{get_task(family).instruction(s)}\n{gold_completion(family, s.answer)}")
    return texts


def build_model(out: Path, paths: dict[str, dict[str, Path]], cfg: DemoConfig, pixels: tuple[int, int]) -> Path:
    from vlm_sapo.demo.synthetic.vocab import build_small_vocab_tiny

    # Qwen2.5-VL's windowed vision attention: the last block attends over the whole image.
    extra = {"vision_fullatt_block_indexes": [cfg.vision_depth - 1]} if cfg.family == "qwen2_5_vl" else {}
    return build_small_vocab_tiny(
        out, tokenizer_corpus(paths, cfg.family), family=cfg.family, vocab_size=cfg.vocab_size, seed=cfg.seed,
        min_pixels=pixels[0], max_pixels=pixels[1], overwrite=True, hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.layers, vision_hidden_size=cfg.vision_hidden,
        vision_intermediate_size=2 * cfg.vision_hidden, vision_depth=cfg.vision_depth, **extra)


def load_split(paths: dict[str, dict[str, Path]], split: str, limit: int | None = None,
               families: tuple[str, ...] = FAMILIES) -> list[Any]:
    from vlm_sapo.data import load_samples

    return [s for family in families for s in load_samples(paths[family][split], task=family, limit=limit).samples]


def cold_start(init_dir: Path, out: Path, paths: dict[str, dict[str, Path]], cfg: DemoConfig,
               pixels: tuple[int, int]) -> dict[str, Any]:
    """Supervised warm-up of the random model; saves the policy and its processor to `out`."""
    from vlm_sapo.demo.sft import prepare_examples, supervised_warmup
    from vlm_sapo.demo.synthetic import gold_completion
    from vlm_sapo.models.loading import load_policy, load_processor
    from vlm_sapo.models.moe import save_policy
    from vlm_sapo.models.vision import freeze_vision_params

    processor = load_processor(init_dir)
    model = load_policy(init_dir, dtype="float32")
    freeze_vision_params(model)  # as in RL (`model.freeze_vision_tower` in the recipe): see the module docstring
    train = prepare_examples(processor, load_split(paths, "train", cfg.sft_rows), family=cfg.family,
                             min_pixels=pixels[0], max_pixels=pixels[1],
                             patch_size=model.config.vision_config.patch_size,
                             completion_for=lambda s: gold_completion(s.task, s.answer))
    train = [e for e in train for _ in range(cfg.sft_grounding_repeats if e.sample.task == "grounding" else 1)]
    result = supervised_warmup(model, processor, train, steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                               seed=cfg.seed)
    save_policy(model, out)
    processor.save_pretrained(out)
    return {"steps": result.steps, "seconds": result.seconds, "loss_first": result.losses[0],
            "loss_last": sum(result.losses[-10:]) / len(result.losses[-10:])}


def evaluate(model_dir: Path, paths: dict[str, dict[str, Path]], pixels: tuple[int, int],
             details_path: Path | None = None, family: str = MODEL_FAMILY, *,
             shuffle_seed: int | None = None) -> dict[str, float]:
    """Greedy accuracy on the held-out test split, scored by each task's own reward, with the spread of the answers
    (`<task>/answers_distinct`, `<task>/answers_top_share`). With `shuffle_seed`, every row is shown another row's
    image (the image-shuffled control)."""
    from vlm_sapo.demo.sft import greedy_accuracy, prepare_examples
    from vlm_sapo.models.loading import load_policy, load_processor

    processor = load_processor(model_dir, min_pixels=pixels[0], max_pixels=pixels[1])
    model = load_policy(model_dir, dtype="float32")
    samples = load_split(paths, "test")
    if shuffle_seed is not None:
        samples = shuffle_images(samples, shuffle_seed)
    examples = prepare_examples(processor, samples, family=family, min_pixels=pixels[0], max_pixels=pixels[1],
                                patch_size=model.config.vision_config.patch_size)
    details: list[dict[str, Any]] = []
    scores = greedy_accuracy(model, processor, examples, details=details)
    if details_path is not None:
        details_path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in details))
    return scores


def shuffle_images(samples: list[Any], seed: int) -> list[Any]:
    """Each row with the image of another row of its task: a seeded derangement (row k of a random order gets the
    image of row k + 1), so no row keeps its own image and every image is used once."""
    import dataclasses
    import random

    out = list(samples)
    rng = random.Random(f"shuffle-{seed}")
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, []).append(i)
    for rows in by_task.values():
        order = rows[:]
        rng.shuffle(order)
        for k, i in enumerate(order):
            out[i] = dataclasses.replace(samples[i], images=samples[order[(k + 1) % len(order)]].images)
    return out


def blind_baseline(paths: dict[str, dict[str, Path]]) -> dict[str, dict]:
    """Per family, the best constant answer on the test split and its accuracy: every distinct gold answer of the
    split (for grounding, every gold box, in the image's own pixels) is tried as the answer to every row, scored by
    the task's own reward. It needs no model: a constant answer does not depend on what the model sees."""
    import dataclasses

    from vlm_sapo.demo.synthetic import gold_completion
    from vlm_sapo.tasks import get_task
    from vlm_sapo.tasks.answers import answer_key

    out = {}
    for task_family in FAMILIES:
        rows = [dataclasses.replace(s, meta={**s.meta, "coord_system": "abs_original",
                                             "image_size": (s.meta.get("image_width"), s.meta.get("image_height"))})
                for s in load_split({task_family: paths[task_family]}, "test", families=(task_family,))]
        task = get_task(task_family)
        candidates = {answer_key(s.answer): s.answer for s in rows}
        best = max(((sum(task.evaluate(gold_completion(task_family, c), s) for s in rows) / len(rows), key)
                    for key, c in sorted(candidates.items())), key=lambda t: t[0])
        out[task_family] = {"accuracy": best[0], "answer": best[1]}
    return out


def rl_overrides(out: Path, cold_dir: Path, data_dir: Path, cfg: DemoConfig) -> list[str]:
    over = [f"model.path={cold_dir}", f"seed={cfg.seed}", f"learner.steps={cfg.rl_steps}",
            f"logging.dir={out / 'rl'}", "checkpoint.resume=never"]
    if cfg.family != MODEL_FAMILY:  # the recipe's pixel budget is the default family's
        lo, hi = image_pixels(cfg.family)
        over += [f"model.min_pixels={lo}", f"model.max_pixels={hi}"]
    for i, family in enumerate(FAMILIES):
        over += [f"data.train.{i}.path={data_dir / family / 'train.jsonl'}",
                 f"data.val.{i}.path={data_dir / family / 'val.jsonl'}"]
    return over


def run_rl(out: Path, cold_dir: Path, data_dir: Path, cfg: DemoConfig, extra: list[str]) -> Path:
    from vlm_sapo.recipe import load_recipe
    from vlm_sapo.trainer import train

    recipe = load_recipe(RECIPE, rl_overrides(out, cold_dir, data_dir, cfg) + list(extra))
    return train(recipe)


# ------------------------------------------------------------------------------------------------------- main
def run_demo(out: Path, cfg: DemoConfig, extra_overrides: list[str] | None = None) -> dict[str, Any]:
    import torch

    from vlm_sapo.demo import report as rep

    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    pixels = image_pixels(cfg.family)
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    paths = make_data(out / "data", cfg)
    init_dir = build_model(out / "init", paths, cfg, pixels)
    blind = blind_baseline(paths)
    timings["data and model"] = time.perf_counter() - t

    t = time.perf_counter()
    cold = cold_start(init_dir, out / "cold_start", paths, cfg, pixels)
    timings["cold start"] = time.perf_counter() - t

    t = time.perf_counter()
    before = evaluate(out / "cold_start", paths, pixels, out / "test_before.jsonl", cfg.family)
    shuffled_before = evaluate(out / "cold_start", paths, pixels, family=cfg.family, shuffle_seed=cfg.seed)
    timings["eval before"] = time.perf_counter() - t
    print("cold start, held-out test:", format_accuracies(before), flush=True)

    t = time.perf_counter()
    run_dir = run_rl(out, out / "cold_start", out / "data", cfg, extra_overrides or [])
    timings["RL"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(run_dir / "hf", paths, pixels, out / "test_after.jsonl", cfg.family)
    shuffled = evaluate(run_dir / "hf", paths, pixels, out / "test_after_shuffled.jsonl", cfg.family,
                        shuffle_seed=cfg.seed)
    timings["eval after"] = time.perf_counter() - t

    families = {}
    for f in FAMILIES:
        families[f] = {"cold_start": 100 * before[f"{f}/accuracy"], "after": 100 * after[f"{f}/accuracy"],
                       "blind": 100 * blind[f]["accuracy"], "shuffled": 100 * shuffled[f"{f}/accuracy"],
                       "top_answer_share_after": 100 * after[f"{f}/answers_top_share"],
                       "top_answer_share_before": 100 * before[f"{f}/answers_top_share"],
                       "distinct_answers_after": after[f"{f}/answers_distinct"],
                       "shuffled_cold_start": 100 * shuffled_before[f"{f}/accuracy"],
                       "blind_answer": blind[f]["answer"]}
        if f"{f}/iou" in after:
            families[f].update(iou_cold_start=100 * before[f"{f}/iou"], iou_after=100 * after[f"{f}/iou"])
    result = {"seed": cfg.seed, "wall_s": time.perf_counter() - t_start, "families": families, "timings": timings,
              "cold_start_training": cold, "config": asdict(cfg)}

    report = out / "report"
    report.mkdir(exist_ok=True)
    rep.plot_curves(run_dir / "metrics.jsonl", result, report)
    samples = load_split(paths, "test")
    details = {name: {d["id"]: d for d in map(json.loads, (out / f"test_{name}.jsonl").read_text().splitlines())}
               for name in ("before", "after")}
    for f in FAMILIES:
        rep.example_grid(f, [s for s in samples if s.task == f], details["before"], details["after"],
                         report / f"{f}_examples.png")
    rep.answer_histograms(samples, details["before"], details["after"], report / "answers.png")
    summary = rep.write_summary(report, result, asdict(cfg))
    (report / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("\n" + rep.results_table(result))
    print(f"\nwall time: {result['wall_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"report: {summary}")
    return result


def format_accuracies(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items() if k.endswith("/accuracy"))


def main(argv: list[str] | None = None) -> int:
    from vlm_sapo.demo.report import seeds_table
    from vlm_sapo.models.tiny import FAMILIES as TINY_FAMILIES

    parser = argparse.ArgumentParser(prog="python -m vlm_sapo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (data, models, RL run, report)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="several seeds run one after another, "
                        "each in <out>/seed<k>, then a table of mean [min, max] per task family (<out>/seeds.md)")
    parser.add_argument("--family", choices=TINY_FAMILIES, default=MODEL_FAMILY, help="the tiny policy's model family "
                        "(qwen3_vl_moe: 4 experts, top-2 routing)")
    parser.add_argument("--rl-steps", type=int, default=DemoConfig.rl_steps)
    parser.add_argument("--sft-steps", type=int, default=DemoConfig.sft_steps)
    parser.add_argument("--threads", type=int, default=DemoConfig.threads, help="torch threads (1 is fastest for "
                        "this tiny model on a busy 2-core machine)")
    parser.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="overrides for the demo recipe "
                        "(vlm_sapo/demo/demo_cpu.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    for seed in args.seeds:
        cfg = DemoConfig(seed=seed, family=args.family, rl_steps=args.rl_steps, sft_steps=args.sft_steps,
                         threads=args.threads)
        out = Path(args.out) if len(args.seeds) == 1 else Path(args.out) / f"seed{seed}"
        results.append(run_demo(out, cfg, args.overrides))
    if len(results) > 1:
        text = seeds_table(results)
        (Path(args.out) / "seeds.md").write_text(text + "\n")
        (Path(args.out) / "seeds.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
