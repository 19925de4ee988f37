"""The ``vlm-sapo`` command. Each sub-command imports its heavy modules only when it runs, so ``--help`` and
``check-recipe`` stay fast."""

from __future__ import annotations

import argparse
import sys


def _check_recipe(args: argparse.Namespace) -> int:
    from vlm_sapo.recipe import RecipeError, dump_recipe, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
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
    from vlm_sapo.trainer import TrainingError, train

    try:
        run_dir = train(recipe, resume=args.resume)
    except TrainingError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    print(f"run finished: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest valid checkpoint of the run (or the one given); "
                        "default: the recipe's checkpoint.resume")
    p.set_defaults(fn=_train)

    p = sub.add_parser("init-tiny", help="build a tiny random Qwen-VL model folder offline (for tests and the demo)")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(fn=_init_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
