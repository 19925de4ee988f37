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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_sapo.data import DataError, PromptTooLongError, RenderedPrompt, Sample
from vlm_sapo.eval.benchmarks import BenchmarkRef, BenchmarkSpec, LoadedBenchmark, load_benchmark, parse_benchmark
from vlm_sapo.eval.prompting import pixel_budget, render_task_prompt
from vlm_sapo.eval.results import BenchmarkResult, EvalResults, Prediction
from vlm_sapo.eval.stats import summarize
from vlm_sapo.reward_pool import RewardPool, load_reward
from vlm_sapo.rollout import EngineContext, SamplingConfig, build_engine
from vlm_sapo.rollout import engine_options as check_engine_options
from vlm_sapo.tasks import coord_system_for_family, default_reward_specs, get_task
from vlm_sapo.tasks.answers import answer_spread, warn_if_collapsed

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
def evaluate(
    engine: Any,
    processor: Any,
    benchmarks: Sequence[BenchmarkRef | BenchmarkSpec | LoadedBenchmark | str],
    *,
    family: str,
    n: int = 1,
    sampling: SamplingConfig | None = None,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    max_prompt_tokens: int | None = None,
    system: str | None = None,
    coord_system: str | None = None,
    pool: RewardPool | None = None,
    reward_workers: int = 2,
    reward_timeout_s: float = 10.0,
    batch_prompts: int = 16,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> EvalResults:
    """Generate `n` completions per sample of each benchmark with `engine` and score them with the tasks' rewards.

    `sampling` defaults to greedy with 1024 new tokens. `limit` caps the rows of benchmarks given by name (a
    `LoadedBenchmark` is used as it is: load once with `load_benchmark` for periodic evaluation). Prompts over
    `max_prompt_tokens` are not evaluated and are counted in `dropped`. `pool` (e.g. the trainer's) must score every
    benchmark task with its own reward; by default a pool is started and closed here. With `out_dir`, writes
    results.json, results.md, predictions.jsonl and results.png there.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    sampling = sampling or SamplingConfig(temperature=0.0, max_new_tokens=1024)
    loaded = [b if isinstance(b, LoadedBenchmark) else load_benchmark(b, data_root=data_root, limit=limit)
              for b in benchmarks]
    _check_unique([b.name for b in loaded])
    coords = coord_system or coord_system_for_family(family)
    min_pixels, max_pixels, patch = pixel_budget(processor)
    own_pool = pool is None
    pool = pool or _pool_for(loaded, reward_workers, reward_timeout_s)
    try:
        jobs: list[tuple[int, RenderedPrompt, Sample]] = []
        dropped: list[dict[str, int]] = [{} for _ in loaded]
        for b, bench in enumerate(loaded):
            for sample in bench.samples:
                try:
                    rendered, ready = render_task_prompt(processor, sample, coord_system=coords, min_pixels=min_pixels,
                                                         max_pixels=max_pixels, image_patch_size=patch,
                                                         max_prompt_tokens=max_prompt_tokens, system=system)
                except PromptTooLongError as err:
                    dropped[b]["too_long"] = dropped[b].get("too_long", 0) + 1
                    log.warning("%s: not evaluated: %s", bench.name, err)
                    continue
                jobs.append((b, rendered, ready))
        outputs = _generate(engine, [r for _, r, _ in jobs], n, sampling, batch_prompts, progress)
        groups: list[list[tuple[Sample, list[_Completion]]]] = [[] for _ in loaded]
        for (b, rendered, sample), completions in zip(jobs, outputs):
            groups[b].append((sample, [_Completion(c.text, sample.meta, rendered.text, c.finish_reason)
                                       for c in completions]))
        results: dict[str, BenchmarkResult] = {}
        predictions: list[Prediction] = []
        for bench, bench_groups, bench_dropped in zip(loaded, groups, dropped):
            result, preds = _score(bench, bench_groups, pool)
            result.dropped = bench_dropped
            results[bench.name] = result
            predictions += preds
    finally:
        if own_pool:
            pool.close()
    settings = {"family": family, "coord_system": coords, "n": n, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                "seed": sampling.seed, "limit": limit, "min_pixels": min_pixels, "max_pixels": max_pixels,
                "max_prompt_tokens": max_prompt_tokens, "engine": getattr(engine, "name", type(engine).__name__),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(settings or {})}
    out = EvalResults(results, predictions, settings)
    if out_dir is not None:
        from vlm_sapo.eval.report import write_results

        write_results(out, out_dir)
    return out


def _check_unique(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"benchmark(s) listed twice: {repeated}")


def _pool_for(loaded: Sequence[LoadedBenchmark], workers: int, timeout_s: float) -> RewardPool:
    return RewardPool(default_reward_specs(sorted({b.spec.task for b in loaded})), workers=workers,
                      timeout_s=timeout_s)


def _generate(engine: Any, prompts: list[RenderedPrompt], n: int, sampling: SamplingConfig, batch_prompts: int,
              progress: bool) -> list[list[Any]]:
    """Completions per prompt, generated `batch_prompts` prompts at a time under a progress bar with ETA."""
    from tqdm import tqdm

    out: list[list[Any]] = []
    with tqdm(total=len(prompts), desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_prompts):
            chunk = prompts[start : start + batch_prompts]
            # distinct seeds per chunk: the engines seed each call's prompts from `seed` + their index in the call
            chunk_sampling = (dataclasses.replace(sampling, seed=sampling.seed + start * n)
                              if sampling.seed is not None else sampling)
            rollouts = engine.generate(chunk, n, chunk_sampling)
            out += rollouts.groups()
            bar.update(len(chunk))
    return out


# -------------------------------------------------------------------------------------------------------- scoring
def _metric_label(task_name: str, pool: RewardPool) -> str:
    task = get_task(task_name)
    label = load_reward(task.reward_name).label
    if not any(spec.applies_to(task_name) and reward.label == label for spec, reward in zip(pool.specs, pool.rewards)):
        raise ValueError(f"the reward pool has no reward labelled {label!r} for task {task_name!r}; pass pool=None "
                         "to score benchmarks with their tasks' own rewards")
    return label


def _score(bench: LoadedBenchmark, groups: list[tuple[Sample, list[_Completion]]],
           pool: RewardPool) -> tuple[BenchmarkResult, list[Prediction]]:
    task = get_task(bench.spec.task)
    label = _metric_label(task.name, pool)
    items = [(s.id, task.name, c.text, s.answer, c.meta) for s, comps in groups for c in comps]
    scored = pool.score(items) if items else []
    metric_key, error_key = f"{label}/{task.metric}", f"{label}/error"
    predictions: list[Prediction] = []
    per_question: list[list[float]] = []
    errors = 0
    k = 0
    for sample, comps in groups:
        values = []
        for j, comp in enumerate(comps):
            result = scored[k]
            k += 1
            if result.scores.get(error_key, 0.0) > 0:
                value = 0.0
                errors += 1
            elif metric_key in result.scores:
                value = result.scores[metric_key]
            else:
                raise RuntimeError(f"benchmark {bench.name!r}: reward {label!r} returned no {task.metric!r} score "
                                   f"for sample {sample.id!r} (scores: {sorted(result.scores)})")
            values.append(value)
            predictions.append(Prediction(
                benchmark=bench.name, id=sample.id, sample_index=j, completion=comp.text,
                parsed_answer=_parse(task, comp.text), score=value, scores=result.scores, answer=sample.answer,
                categories=bench.categories.get(sample.id, []), prompt=comp.prompt, finish_reason=comp.finish_reason,
                error=result.error,
                scoring_meta={key: comp.meta[key] for key in SCORING_META_KEYS if comp.meta.get(key) is not None},
            ))
        per_question.append(values)
    spread = answer_spread(None if str(p.parsed_answer).startswith("<parse error") else p.parsed_answer
                           for p in predictions)
    warn_if_collapsed(spread, task.name, f"benchmark {bench.name}")
    by_category: dict[str, list[list[float]]] = {}
    for (sample, _), values in zip(groups, per_question):
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
        result, scored = _score(bench, groups, pool)
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
def run_eval(
    model: str | os.PathLike,
    benchmarks: Sequence[str],
    *,
    backend: str = "vllm",
    n: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    max_prompt_tokens: int = 2048,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_max_pixels: int | None = None,
    video_max_frames: int | None = None,
    video_fps: float | None = None,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: str = "auto",
    coord_system: str | None = None,
    system: str | None = None,
    batch_prompts: int = 16,
    reward_workers: int = 2,
    reward_timeout_s: float = 10.0,
    engine_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> EvalResults:
    """`vlm-sapo eval`: load the model folder's processor and a registered rollout engine (`backend`, with its own
    options as in a recipe's `rollout.<backend>:` section), then `evaluate`.

    `temperature` None means greedy for n = 1 and 1.0 for n > 1 (pass@k needs different samples).
    """
    from transformers import AutoConfig

    from vlm_sapo.models.loading import load_processor, model_family

    check_engine_options(backend, engine_options)  # an unknown backend or option fails before any model loads
    refs = [parse_benchmark(b) for b in benchmarks]  # fail on a bad name before loading a model
    loaded = [load_benchmark(r, data_root=data_root, limit=limit) for r in refs]
    temperature = (0.0 if n == 1 else 1.0) if temperature is None else temperature
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    # with a video budget given, its floor is the recipe default (the checkpoint's may exceed the budget)
    video_min_pixels = min(video_max_pixels, 3136) if video_max_pixels else None
    processor = load_processor(model, min_pixels=min_pixels, max_pixels=max_pixels, video_min_pixels=video_min_pixels,
                               video_max_pixels=video_max_pixels, video_max_frames=video_max_frames,
                               video_fps=video_fps)
    family = model_family(AutoConfig.from_pretrained(model))
    ctx = EngineContext(model_path=str(model), processor=processor, dtype=dtype, seed=seed,
                        max_model_len=max_prompt_tokens + max_new_tokens, max_batch_prompts=batch_prompts,
                        max_videos_per_prompt=int(any(s.video is not None for b in loaded for s in b.samples)))
    engine = build_engine(backend, ctx, engine_options)
    try:
        return evaluate(engine, processor, loaded, family=family, n=n, sampling=sampling, limit=limit,
                        out_dir=out_dir, max_prompt_tokens=max_prompt_tokens, system=system,
                        coord_system=coord_system, reward_workers=reward_workers, reward_timeout_s=reward_timeout_s,
                        batch_prompts=batch_prompts, progress=progress,
                        settings={"model": str(model), "backend": backend, "dtype": dtype})
    finally:
        engine.close()
