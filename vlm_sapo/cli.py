"""The ``vlm-sapo`` command. Each sub-command imports its heavy modules only when it runs, so ``--help`` and
``check-recipe`` stay fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _check_recipe(args: argparse.Namespace) -> int:
    from vlm_sapo.recipe import RecipeError, dump_recipe, load_recipe
    from vlm_sapo.rollout import check_rollout

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_rollout(recipe.rollout, source=args.recipe)  # the engine registry's part: the backend and its section
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 2
    print(dump_recipe(recipe), end="")
    return 0


def _init_tiny(args: argparse.Namespace) -> int:
    from vlm_sapo.models.tiny import build_tiny

    out = build_tiny(args.out_dir, family=args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny {args.family} written to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    from vlm_sapo.recipe import RecipeError, load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 2
    from vlm_sapo.rollout import RolloutEngineError
    from vlm_sapo.scoring import RewardError
    from vlm_sapo.trainer import TrainingError, train

    try:
        run_dir = train(recipe, resume=args.resume)
    except RecipeError as e:  # found once the model is loaded (e.g. routing replay on a dense model)
        print(e, file=sys.stderr)
        return 2
    except (TrainingError, RewardError, RolloutEngineError) as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    print(f"run finished: {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import logging

    from vlm_sapo.data import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model = args.model
    if model.startswith("tiny:"):
        from vlm_sapo.models.tiny import resolve_tiny

        model = resolve_tiny(model)
    from vlm_sapo.eval.config import EvalRun
    from vlm_sapo.eval.harness import run_eval
    from vlm_sapo.eval.report import console_report
    from vlm_sapo.recipe import RecipeError, apply_overrides

    try:  # KEY=VALUE, typed as recipe overrides are; the engine's own schema checks them
        options = apply_overrides({}, args.engine_option)
    except RecipeError as e:
        print(f"eval failed: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path("eval_results") / (Path(model).name or "model"))
    try:
        results = run_eval(EvalRun(
            model, tuple(b for b in args.benchmarks.split(",") if b.strip()), backend=args.backend, n=args.n,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
            video_max_pixels=args.video_max_pixels, video_max_frames=args.video_max_frames, video_fps=args.video_fps,
            limit=args.limit, data_root=args.data_root, out_dir=out, seed=args.seed, dtype=args.dtype,
            coord_system=args.coord_system, system=args.system, batch_prompts=args.batch_prompts,
            reward_workers=args.reward_workers, reward_timeout_s=args.reward_timeout, engine_options=options,
            progress=not args.no_progress,
        ))
    except (DataError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"eval failed: {e}", file=sys.stderr)
        return 2
    print(console_report(results.to_dict()), end="")
    print(f"results written to {out}/ (results.json, results.md, predictions.jsonl, results.png)")
    return 0


def _score(args: argparse.Namespace) -> int:
    import logging

    from vlm_sapo.data import DataError
    from vlm_sapo.eval.harness import score_predictions
    from vlm_sapo.eval.report import console_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or str(Path(args.predictions).with_suffix("")) + "_scored"
    try:
        results = score_predictions(args.predictions, args.benchmark, data_root=args.data_root,
                                    coord_system=args.coord_system, min_pixels=args.min_pixels,
                                    max_pixels=args.max_pixels, patch_size=args.patch_size, out_dir=out,
                                    reward_workers=args.reward_workers, reward_timeout_s=args.reward_timeout)
    except (DataError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"score failed: {e}", file=sys.stderr)
        return 2
    data = results.to_dict()
    print(console_report(data), end="")
    for name, bench in data["benchmarks"].items():
        unknown, missing = bench["dropped"].get("unknown_ids", 0), bench["dropped"].get("missing_ids", 0)
        if unknown:
            print(f"{name}: {unknown} prediction id(s) are not in the benchmark (not scored), e.g. "
                  f"{bench['unknown_ids'][:5]}", file=sys.stderr)
        if missing:
            print(f"{name}: {missing} benchmark sample(s) have no prediction (not scored), e.g. "
                  f"{bench['missing_ids'][:5]}", file=sys.stderr)
    other = data["settings"].get("rows_of_other_benchmarks", 0)
    if other:
        print(f"{other} row(s) of other benchmarks ignored", file=sys.stderr)
    print(f"results written to {out}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vlm_sapo.eval.report import compare_results, load_results, results_label

    try:
        a, b = load_results(args.results_a), load_results(args.results_b)
    except (FileNotFoundError, ValueError) as e:
        print(f"compare failed: {e}", file=sys.stderr)
        return 2
    la, lb = results_label(args.results_a), results_label(args.results_b)
    if la == lb:
        la, lb = "A", "B"
    table = compare_results(a, b, label_a=la, label_b=lb)
    print(f"A = {args.results_a}\nB = {args.results_b}\n\n{table}", end="")
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from vlm_sapo.demo.synthetic import ALL_FAMILIES, make_synthetic_data

    families = tuple(args.families.split(",")) if args.families else ALL_FAMILIES
    paths = make_synthetic_data(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                families=families)
    for family, splits in paths.items():
        print(f"{family}: " + ", ".join(f"{split} {path}" for split, path in splits.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag of `vlm-sapo`, declared in one place; a flat list of declarations, so longer than
    80 lines on purpose (each subcommand's handler is its own function above)."""
    from vlm_sapo.models.tiny import FAMILIES as TINY_FAMILIES  # light: the builder imports transformers lazily

    parser = argparse.ArgumentParser(
        prog="vlm-sapo", description="RL for vision-language models with SAPO (Soft Adaptive Policy Optimization)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check-recipe", help="validate a recipe and print it resolved (exit 2 on errors)")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="typed overrides")
    p.set_defaults(fn=_check_recipe)

    p = sub.add_parser("train", help="train a policy with RL from a recipe")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="typed overrides")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT|force",
                   help="continue from the newest valid checkpoint of the run (or the one given); a checkpoint "
                        "written under a different recipe is refused (see vlm_sapo.resume_guard) unless `--resume "
                        "force`; default: the recipe's checkpoint.resume")
    p.set_defaults(fn=_train)

    p = sub.add_parser("init-tiny", help="build a tiny random Qwen-VL model folder offline (for tests and the demo)")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=list(TINY_FAMILIES), default="qwen2_5_vl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(fn=_init_tiny)

    p = sub.add_parser("make-data", help="write a synthetic data set (math, chart, grounding, motion (video); JSONL + "
                                         "PNG splits)")
    p.add_argument("kind", choices=["synthetic"])
    p.add_argument("--out", required=True, help="folder to write <family>/{train,val,test}.jsonl and images to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1000, help="rows per family")
    p.add_argument("--n-val", type=int, default=64, help="rows per family")
    p.add_argument("--n-test", type=int, default=200, help="rows per family")
    p.add_argument("--families", help="comma-separated subset (default: math,chart,grounding,motion)")
    p.set_defaults(fn=_make_data)

    p = sub.add_parser("eval", help="evaluate a model on benchmarks with the training prompts and rewards")
    p.add_argument("--model", required=True, help="model folder (an exported HF folder, `init-tiny`, or tiny:FAMILY)")
    p.add_argument("--benchmarks", required=True, metavar="A,B",
                   help="comma-separated: NAME, NAME=PATH_OR_HUB_ID, NAME:SPLIT, jsonl:[TASK:]PATH "
                        "(geometry3k, mathvista, mathverse, mathvision, wemath, chartqa, refcoco, refcoco+, refcocog)")
    p.add_argument("--data-root", help="folder holding benchmark folders (by name) and relative benchmark paths")
    p.add_argument("--out", help="output folder (default eval_results/<model folder name>)")
    p.add_argument("--limit", type=int, help="first N rows of each benchmark")
    p.add_argument("--n", type=int, default=1, help="completions per question (pass@k, avg@K)")
    p.add_argument("--backend", default="vllm", help="a registered rollout engine (hf, vllm, ...)")
    p.add_argument("--temperature", type=float, help="default: 0 (greedy) for --n 1, else 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are counted, not evaluated")
    p.add_argument("--min-pixels", type=int, help="image pixel budget (default: the processor's)")
    p.add_argument("--max-pixels", type=int, help="image pixel budget (default: the processor's)")
    p.add_argument("--video-max-pixels", type=int, help="pixels per video frame (as model.video_max_pixels)")
    p.add_argument("--video-max-frames", type=int, help="frames per video (as data.video_max_frames)")
    p.add_argument("--video-fps", type=float, help="video sampling rate (as data.video_fps)")
    p.add_argument("--coord-system", choices=["rel1000", "abs_resized", "abs_original"],
                   help="grounding box units asked for (default: the model family's)")
    p.add_argument("--system", help="system prompt (as data.system_prompt in training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per reward call")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the backend, as in a recipe's rollout.<backend> section (e.g. "
                        "cpu_kvcache_gib=2 for vllm); repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_eval)

    p = sub.add_parser("score", help="score predictions made elsewhere (JSON lines: id, completion) on a benchmark")
    p.add_argument("predictions", help="JSON lines with `id` and `completion` (or `prediction`)")
    p.add_argument("--benchmark", required=True, help="NAME, NAME=PATH_OR_HUB_ID, NAME:SPLIT or jsonl:[TASK:]PATH")
    p.add_argument("--data-root")
    p.add_argument("--out", help="output folder (default <predictions>_scored)")
    p.add_argument("--coord-system", choices=["rel1000", "abs_resized", "abs_original"],
                   help="grounding: box units of rows that do not say (no default: a guess would score all wrong)")
    p.add_argument("--min-pixels", type=int, help="grounding abs_resized: the processor's pixel budget")
    p.add_argument("--max-pixels", type=int, help="grounding abs_resized: the processor's pixel budget")
    p.add_argument("--patch-size", type=int, default=14, help="grounding abs_resized: 14 (Qwen2/2.5-VL), 16 (Qwen3-VL)")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0)
    p.set_defaults(fn=_score)

    p = sub.add_parser("compare", help="side-by-side table of two evaluations, with deltas")
    p.add_argument("results_a", help="results.json or the run folder holding it")
    p.add_argument("results_b", help="results.json or the run folder holding it")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.set_defaults(fn=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
