"""Evaluation = generate with the training prompts + score with the training rewards, then count.

`evaluate` takes a running rollout engine (the trainer's own, for periodic evaluation), `score_predictions` scores
completions made elsewhere against a benchmark's gold answers, and `run_eval` is `vlm-sapo eval`: it loads a model
folder, builds an engine and calls `evaluate`. Rewards run in a `RewardPool` (time limits, isolated failures); a
completion whose reward fails scores 0 and is counted in `reward_errors`, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_sapo.data import DataError, PromptTooLongError, RenderedPrompt, Sample
from vlm_sapo.eval.benchmarks import BenchmarkRef, BenchmarkSpec, LoadedBenchmark, load_benchmark, parse_benchmark
from vlm_sapo.eval.config import EvalConfig, EvalRun
from vlm_sapo.eval.generate import generate_and_score
from vlm_sapo.eval.results import BenchmarkResult, EvalResults, Prediction
from vlm_sapo.eval.stats import summarize
from vlm_sapo.rollout import EngineContext, build_engine
from vlm_sapo.rollout import engine_options as check_engine_options
from vlm_sapo.scoring import ScoreResult
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import coord_system_for_family, default_reward_specs, get_task, metric_key
from vlm_sapo.tasks.answers import answer_spread, warn_if_collapsed
from vlm_sapo.tasks.prompting import pixel_budget, render_task_prompt

log = logging.getLogger(__name__)

SCORING_META_KEYS = ("coord_system", "model_input_size", "image_size")
MAX_LISTED_IDS = 50


@dataclasses.dataclass
class _Completion:
    text: str
    meta: dict[str, Any]  # the meta to score with
    prompt: str | None = None
    finish_reason: str | None = None


# --------------------------------------------------------------------------------------------------------- evaluate
def evaluate(engine: Any, processor: Any, benchmarks: Sequence[BenchmarkRef | BenchmarkSpec | LoadedBenchmark | str],
             config: EvalConfig, *, pool: RewardPool | None = None, out_dir: str | os.PathLike | None = None,
             progress: bool = True, settings: dict[str, Any] | None = None) -> EvalResults:
    """Generate `config.n` completions per sample of each benchmark with `engine` and score them with the tasks'
    rewards (`generate_and_score`, as validation does).

    A `LoadedBenchmark` is used as it is (load once with `load_benchmark` for periodic evaluation); others are loaded
    with `config.limit` and `config.data_root`. `pool` (e.g. the trainer's) must score every benchmark task with its
    own reward; by default a pool is started and closed here. With `out_dir`, writes results.json, results.md,
    predictions.jsonl and results.png there; `settings` adds entries to the results' settings.
    """
    loaded = [b if isinstance(b, LoadedBenchmark) else load_benchmark(b, data_root=config.data_root,
                                                                      limit=config.limit) for b in benchmarks]
    _check_unique([b.name for b in loaded])
    coords = config.coord_system or coord_system_for_family(config.family)
    budget = pixel_budget(processor)
    own_pool = pool is None
    pool = pool or _pool_for(loaded, config.reward_workers, config.reward_timeout_s)
    try:
        keys = [_metric_key(get_task(b.spec.task), pool) for b in loaded]  # before generating anything
        rendered = [_render_benchmark(processor, b, coords, budget, config) for b in loaded]
        scored = generate_and_score(engine, [pairs for pairs, _ in rendered], pool, n=config.n,
                                    sampling=config.sampling, batch_prompts=config.batch_prompts, progress=progress)
        results: dict[str, BenchmarkResult] = {}
        predictions: list[Prediction] = []
        for bench, key, (_, dropped), part in zip(loaded, keys, rendered, scored):
            groups = [(sample, [_Completion(c.text, sample.meta, prompt.text, c.finish_reason) for c in comps], sc)
                      for sample, prompt, comps, sc in part.groups()]
            result, preds = _summarise(bench, groups, key)
            result.dropped = dropped
            results[bench.name] = result
            predictions += preds
    finally:
        if own_pool:
            pool.close()
    sampling, (min_pixels, max_pixels, _) = config.sampling, budget
    settings = {"family": config.family, "coord_system": coords, "n": config.n, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                "seed": sampling.seed, "limit": config.limit, "min_pixels": min_pixels, "max_pixels": max_pixels,
                "max_prompt_tokens": config.max_prompt_tokens,
                "engine": getattr(engine, "name", type(engine).__name__),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(settings or {})}
    out = EvalResults(results, predictions, settings)
    if out_dir is not None:
        from vlm_sapo.eval.report import write_results

        write_results(out, out_dir)
    return out


def _render_benchmark(processor: Any, bench: LoadedBenchmark, coords: str, budget: tuple[int, int, int],
                      config: EvalConfig) -> tuple[list[tuple[RenderedPrompt, Sample]], dict[str, int]]:
    """The benchmark's prompts as training renders them, and what was dropped (`too_long`)."""
    min_pixels, max_pixels, patch = budget
    pairs: list[tuple[RenderedPrompt, Sample]] = []
    dropped: dict[str, int] = {}
    for sample in bench.samples:
        try:
            pairs.append(render_task_prompt(processor, sample, coord_system=coords, min_pixels=min_pixels,
                                            max_pixels=max_pixels, image_patch_size=patch,
                                            max_prompt_tokens=config.max_prompt_tokens, system=config.system))
        except PromptTooLongError as err:
            dropped["too_long"] = dropped.get("too_long", 0) + 1
            log.warning("%s: not evaluated: %s", bench.name, err)
    return pairs, dropped


def _check_unique(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"benchmark(s) listed twice: {repeated}")


def _pool_for(loaded: Sequence[LoadedBenchmark], workers: int, timeout_s: float) -> RewardPool:
    return RewardPool(default_reward_specs(sorted({b.spec.task for b in loaded})), workers=workers,
                      timeout_s=timeout_s)


# -------------------------------------------------------------------------------------------------------- scoring
def _metric_key(task: Any, pool: RewardPool) -> str:
    key = metric_key(task, pool.specs)
    if key is None:
        raise ValueError(f"the reward pool has no reward {task.reward_name!r} for task {task.name!r}; pass pool=None "
                         "to score benchmarks with their tasks' own rewards")
    return key


def _summarise(bench: LoadedBenchmark, groups: list[tuple[Sample, list[_Completion], list[ScoreResult]]],
               key: str) -> tuple[BenchmarkResult, list[Prediction]]:
    """A benchmark's result and predictions from its scored completions; `key` is its task's metric score."""
    task = get_task(bench.spec.task)
    label = key.rpartition("/")[0]
    error_key = f"{label}/error"
    predictions: list[Prediction] = []
    per_question: list[list[float]] = []
    errors = 0
    for sample, comps, scored in groups:
        values = []
        for j, (comp, result) in enumerate(zip(comps, scored)):
            if result.scores.get(error_key, 0.0) > 0:
                value = 0.0
                errors += 1
            elif key in result.scores:
                value = result.scores[key]
            else:
                raise RuntimeError(f"benchmark {bench.name!r}: reward {label!r} returned no {task.metric!r} score "
                                   f"for sample {sample.id!r} (scores: {sorted(result.scores)})")
            values.append(value)
            predictions.append(Prediction(
                benchmark=bench.name, id=sample.id, sample_index=j, completion=comp.text,
                parsed_answer=_parse(task, comp.text), score=value, scores=result.scores, answer=sample.answer,
                categories=bench.categories.get(sample.id, []), prompt=comp.prompt, finish_reason=comp.finish_reason,
                error=result.error,
                scoring_meta={k: comp.meta[k] for k in SCORING_META_KEYS if comp.meta.get(k) is not None},
            ))
        per_question.append(values)
    spread = answer_spread(None if str(p.parsed_answer).startswith("<parse error") else p.parsed_answer
                           for p in predictions)
    warn_if_collapsed(spread, task.name, f"benchmark {bench.name}")
    by_category: dict[str, list[list[float]]] = {}
    for (sample, _, _), values in zip(groups, per_question):
        for category in bench.categories.get(sample.id, []):
            by_category.setdefault(category, []).append(values)
    result = BenchmarkResult(
        name=bench.name, task=task.name, metric=task.metric, metric_label=bench.spec.metric_label,
        reference=bench.spec.reference, source=bench.source, layout=bench.layout, questions=len(groups),
        completions_per_question=min((len(v) for v in per_question), default=0),
        overall=summarize(per_question),
        categories={c: (len(v), summarize(v)) for c, v in sorted(by_category.items())},
        reward_errors=errors, skipped_rows=[str(b) for b in bench.skipped],
        answers=spread.as_dict(),
    )
    if errors:
        log.warning("%s: %d completion(s) scored 0 because their reward failed or timed out", bench.name, errors)
    return result, predictions


def _parse(task: Any, text: str) -> Any:
    try:
        return task.parse_answer(text)
    except Exception as err:  # a parser bug must not lose the scored prediction
        return f"<parse error: {type(err).__name__}: {err}>"


# ------------------------------------------------------------------------------------------------ score (offline)
def read_predictions(path: str | os.PathLike, benchmark: str | None = None) -> tuple[dict[str, list[dict]], int]:
    """Prediction rows grouped by id (file order kept), and how many rows named another benchmark.

    A row needs `id` and a string `completion` (or `prediction`); every bad row is reported with its line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    grouped: dict[str, list[dict]] = {}
    bad: list[str] = []
    other = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(f"{path} line {lineno}: invalid JSON: {err}")
                continue
            if not isinstance(row, dict):
                bad.append(f"{path} line {lineno}: a row must be a JSON object")
                continue
            if benchmark is not None and row.get("benchmark") not in (None, benchmark):
                other += 1
                continue
            sid = row.get("id")
            if isinstance(sid, bool) or not isinstance(sid, (str, int)) or not str(sid).strip():
                bad.append(f"{path} line {lineno}, key 'id': missing or not a string/integer")
                continue
            text = row.get("completion", row.get("prediction"))
            if not isinstance(text, str):
                bad.append(f"{path} line {lineno}, key 'completion' (or 'prediction'): missing or not a string")
                continue
            grouped.setdefault(str(sid).strip(), []).append({**row, "completion": text})
    if bad:
        listed = "\n".join(f"  - {b}" for b in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} bad prediction row(s):\n{listed}{more}")
    if not grouped:
        raise DataError(f"{path}: no predictions" + (f" for benchmark {benchmark!r}" if benchmark else ""))
    return grouped, other


def score_predictions(
    predictions: str | os.PathLike,
    benchmark: BenchmarkRef | BenchmarkSpec | LoadedBenchmark | str,
    *,
    data_root: str | os.PathLike | None = None,
    coord_system: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    patch_size: int = 14,
    out_dir: str | os.PathLike | None = None,
    pool: RewardPool | None = None,
    reward_workers: int = 2,
    reward_timeout_s: float = 10.0,
) -> EvalResults:
    """Score completions made elsewhere with the benchmark's task, joined to its gold answers by id.

    Ids the benchmark lacks are listed in `unknown_ids`, benchmark samples without predictions in `missing_ids`;
    neither is scored. Grounding needs each box's units: a row's own `coord_system` / `model_input_size` /
    `image_size` (as `vlm-sapo eval` writes them) win, else `coord_system`; `abs_resized` without a row's
    `model_input_size` recomputes it with qwen-vl-utils' smart_resize from `min_pixels`, `max_pixels` and `patch_size`.
    """
    bench = benchmark if isinstance(benchmark, LoadedBenchmark) else load_benchmark(benchmark, data_root=data_root)
    rows, other = read_predictions(predictions, bench.name)
    by_id = {s.id: s for s in bench.samples}
    unknown = [i for i in rows if i not in by_id]
    missing = [s.id for s in bench.samples if s.id not in rows]
    groups: list[tuple[Sample, list[_Completion]]] = []
    grounding = bench.spec.task == "grounding"
    for sample in bench.samples:
        if sample.id not in rows:
            continue
        comps = []
        size: list[tuple[int, int]] = []  # the decoded image's size, read once per sample when a row lacks it
        for row in rows[sample.id]:
            meta = dict(sample.meta)
            meta.update({k: row[k] for k in SCORING_META_KEYS if row.get(k) is not None})
            if grounding:
                if meta.get("image_size") is None:
                    size = size or [sample.load_images()[0].size]
                    meta["image_size"] = size[0]
                meta = _grounding_meta(sample, meta, coord_system, min_pixels, max_pixels, patch_size)
            comps.append(_Completion(row["completion"], meta, row.get("prompt"), row.get("finish_reason")))
        groups.append((sample, comps))
    if unknown:
        log.warning("%s: %d prediction id(s) not in the benchmark, not scored: %s", bench.name, len(unknown),
                    unknown[:5])
    if missing:
        log.warning("%s: %d benchmark sample(s) have no prediction, not scored: %s", bench.name, len(missing),
                    missing[:5])
    own_pool = pool is None
    pool = pool or _pool_for([bench], reward_workers, reward_timeout_s)
    try:
        key = _metric_key(get_task(bench.spec.task), pool)
        items = [(s.id, bench.spec.task, c.text, s.answer, c.meta) for s, comps in groups for c in comps]
        flat = iter(pool.score(items) if items else [])
        result, scored = _summarise(bench, [(s, comps, [next(flat) for _ in comps]) for s, comps in groups], key)
    finally:
        if own_pool:
            pool.close()
    result.unknown_ids, result.missing_ids = unknown[:MAX_LISTED_IDS], missing[:MAX_LISTED_IDS]
    result.dropped = {"unknown_ids": len(unknown), "missing_ids": len(missing)}
    settings = {"predictions": str(predictions), "benchmark": bench.name, "coord_system": coord_system,
                "rows_of_other_benchmarks": other, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = EvalResults({bench.name: result}, scored, settings)
    if out_dir is not None:
        from vlm_sapo.eval.report import write_results

        write_results(out, out_dir)
    return out


def _grounding_meta(sample: Sample, meta: dict[str, Any], coord_system: str | None, min_pixels: int | None,
                    max_pixels: int | None, patch_size: int) -> dict[str, Any]:
    meta.setdefault("coord_system", coord_system)
    if meta["coord_system"] is None:
        raise DataError(f"sample {sample.id!r}: grounding predictions need their box units: give --coord-system "
                        "(rel1000 for Qwen2-VL/Qwen3-VL, abs_resized for Qwen2.5-VL, abs_original) or a "
                        "'coord_system' key per row")
    if meta["coord_system"] == "abs_resized" and meta.get("model_input_size") is None:
        if min_pixels is None or max_pixels is None:
            raise DataError(f"sample {sample.id!r}: abs_resized boxes without a row 'model_input_size' need "
                            "--min-pixels and --max-pixels (the processor's budget) to recompute the resized size")
        from qwen_vl_utils import smart_resize

        width, height = meta["image_size"]
        h, w = smart_resize(int(height), int(width), factor=patch_size * 2, min_pixels=min_pixels,
                            max_pixels=max_pixels)
        meta["model_input_size"] = (w, h)
    return meta


# ------------------------------------------------------------------------------------------------- vlm-sapo eval
def run_eval(run: EvalRun) -> EvalResults:
    """`vlm-sapo eval`: load the model folder's processor and a registered rollout engine (`run.backend`, with its
    own options as in a recipe's `rollout.<backend>:` section), then `evaluate`."""
    from transformers import AutoConfig

    from vlm_sapo.models.loading import load_processor, model_family

    check_engine_options(run.backend, run.engine_options)  # an unknown backend or option fails before any model loads
    refs = [parse_benchmark(b) for b in run.benchmarks]  # fail on a bad name before loading a model
    loaded = [load_benchmark(r, data_root=run.data_root, limit=run.limit) for r in refs]
    # with a video budget given, its floor is the recipe default (the checkpoint's may exceed the budget)
    video_min_pixels = min(run.video_max_pixels, 3136) if run.video_max_pixels else None
    processor = load_processor(run.model, min_pixels=run.min_pixels, max_pixels=run.max_pixels,
                               video_min_pixels=video_min_pixels, video_max_pixels=run.video_max_pixels,
                               video_max_frames=run.video_max_frames, video_fps=run.video_fps)
    family = model_family(AutoConfig.from_pretrained(run.model))
    engine = _build_engine(run, processor, loaded)
    try:
        return evaluate(engine, processor, loaded, run.config(family), out_dir=run.out_dir, progress=run.progress,
                        settings={"model": str(run.model), "backend": run.backend, "dtype": run.dtype})
    finally:
        engine.close()


def _build_engine(run: EvalRun, processor: Any, loaded: Sequence[LoadedBenchmark]) -> Any:
    """The registered rollout engine `run.backend` names, for the model folder `run.model`."""
    ctx = EngineContext(model_path=str(run.model), processor=processor, dtype=run.dtype, seed=run.seed,
                        max_model_len=run.max_prompt_tokens + run.max_new_tokens, max_batch_prompts=run.batch_prompts,
                        max_videos_per_prompt=int(any(s.video is not None for b in loaded for s in b.samples)))
    return build_engine(run.backend, ctx, run.engine_options)
