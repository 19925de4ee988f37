"""Evaluation: benchmark adapters, `generate_and_score` (the one evaluation path: generate with an engine, score with
the tasks; validation, `evaluate` and the demo's accuracy all call it), `evaluate` (benchmarks, with the training
prompts and rewards), offline scoring of predictions, result files and comparisons. `vlm-sapo eval | score | compare`
call these."""

from vlm_sapo.eval.benchmarks import (
    BenchmarkRef,
    BenchmarkSpec,
    Layout,
    LoadedBenchmark,
    get_benchmark,
    list_benchmarks,
    load_benchmark,
    parse_benchmark,
    register_benchmark,
)
from vlm_sapo.eval.config import EvalConfig, EvalRun
from vlm_sapo.eval.generate import Scored, generate_and_score
from vlm_sapo.eval.harness import evaluate, read_predictions, run_eval, score_predictions
from vlm_sapo.eval.report import compare_results, load_results, write_results
from vlm_sapo.eval.results import BenchmarkResult, EvalResults, Prediction
from vlm_sapo.eval.stats import Estimate, pass_at_k, summarize, wilson_interval

__all__ = [
    "BenchmarkRef",
    "BenchmarkResult",
    "BenchmarkSpec",
    "Estimate",
    "EvalConfig",
    "EvalResults",
    "EvalRun",
    "Layout",
    "LoadedBenchmark",
    "Prediction",
    "Scored",
    "compare_results",
    "evaluate",
    "generate_and_score",
    "get_benchmark",
    "list_benchmarks",
    "load_benchmark",
    "load_results",
    "parse_benchmark",
    "pass_at_k",
    "read_predictions",
    "register_benchmark",
    "run_eval",
    "score_predictions",
    "summarize",
    "wilson_interval",
    "write_results",
]
