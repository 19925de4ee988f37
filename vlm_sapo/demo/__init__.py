"""The CPU demo (`python -m vlm_sapo.demo`, what `make demo` runs): a tiny VLM learns synthetic visual tasks with SAPO.

- `pipeline`: data, model, cold start, RL with the demo recipe, evaluation and the controls (its names are exported
  here: `from vlm_sapo import demo; demo.cold_start(...)`);
- `sft`: the supervised cold start and its greedy accuracy;
- `report`: the report's tables, curves, example grids and answer histograms;
- `synthetic`: the synthetic tasks drawn from a seed (math, chart, grounding; motion, a video task) and the
  small-vocabulary tiny Qwen-VL. `vlm-sapo make-data synthetic` writes them too; the tasks that score them live in
  `vlm_sapo/tasks` and `rewards/`, as for any data set.

Importing this package is cheap: the pipeline imports torch, transformers and the trainer inside its functions.
"""

from vlm_sapo.demo.pipeline import (
    FAMILIES,
    MODEL_FAMILY,
    RECIPE,
    DemoConfig,
    blind_baseline,
    build_model,
    cold_start,
    evaluate,
    format_accuracies,
    image_pixels,
    load_split,
    main,
    make_data,
    rl_overrides,
    run_demo,
    run_rl,
    shuffle_images,
    split_paths,
    tokenizer_corpus,
)

__all__ = [
    "FAMILIES",
    "MODEL_FAMILY",
    "RECIPE",
    "DemoConfig",
    "blind_baseline",
    "build_model",
    "cold_start",
    "evaluate",
    "format_accuracies",
    "image_pixels",
    "load_split",
    "main",
    "make_data",
    "rl_overrides",
    "run_demo",
    "run_rl",
    "shuffle_images",
    "split_paths",
    "tokenizer_corpus",
]
