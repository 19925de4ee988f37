"""Rewards named by a recipe: specs, loading, and a reward's return value as finite named scores.

A reward is named by a built-in name (``math``, ``grounding``, ``chart``, ``motion``, ``format``, ``mathvista_reward``:
each is ``rewards/<name>.py``), by ``path/to/file.py:function`` (``path/to/file.py`` alone means its ``compute_score``),
or by an entry point installed in group ``vlm_sapo.rewards``; nothing else is ever imported. A reward module may set
``REWARD_TYPE = "batch"``: its function then takes ``(completions, ground_truths, metas, **kwargs)`` and returns one
dict per sample.

``vlm_sapo.scoring.pool.RewardPool`` runs these loaded rewards in isolated workers; ``InProcessScorer`` (below) scores
the same way in this process, and ``Task.reward`` calls one reward in-process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from vlm_sapo.suggest import did_you_mean

ENTRY_POINT_GROUP = "vlm_sapo.rewards"
BUILTIN_REWARDS = {
    "math": "rewards.math",
    "grounding": "rewards.grounding",
    "chart": "rewards.chart",
    "motion": "rewards.motion",
    "format": "rewards.format",
    "mathvista_reward": "rewards.mathvista_reward",
}


class RewardError(RuntimeError):
    """A reward that cannot be loaded, or that failed on every sample it was given."""


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a recipe's ``rewards.functions``: which reward, its weight in ``overall``, which tasks it scores
    (None: all), and keyword arguments passed to it on every call (they win over same-named meta keys)."""

    name: str
    weight: float = 1.0
    tasks: tuple[str, ...] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None  # prefix of its logged scores; default: the reward's name, or the file's stem

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RewardError(f"a reward needs a name, got {self.name!r}")
        if not math.isfinite(float(self.weight)):
            raise RewardError(f"reward {self.name!r}: weight must be finite, got {self.weight!r}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks))

    @classmethod
    def coerce(cls, value: RewardSpec | str | Mapping[str, Any] | Any) -> RewardSpec:
        """A spec from a spec, a bare name, a mapping, or a recipe's ``RewardFnCfg`` (anything with ``model_dump``)."""
        if isinstance(value, RewardSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping):
            return cls(**value)
        raise RewardError(f"cannot read a reward entry from {value!r}")

    def applies_to(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


class ScoreItem(NamedTuple):
    sample_id: str
    task: str
    completion: str
    ground_truth: Any
    meta: Mapping[str, Any]


class ScoreResult(NamedTuple):
    overall: float  # sum over the rewards that apply to the sample of weight * that reward's overall
    scores: dict[str, float]  # "<label>/<key>" for every score of every reward, plus "<label>/error" (0 or 1)
    error: str | None  # the failures' messages, or None


# ------------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class LoadedReward:
    """A resolved reward function with what is needed to call it safely."""

    label: str
    fn: Callable[..., Any]
    batch: bool
    kwargs: Mapping[str, Any]
    accepts: frozenset[str] | None  # keyword names it takes from meta; None: all (it has **kwargs)
    positional: frozenset[str]  # its completion/ground-truth parameter names, never filled from meta

    def score_one(self, completion: str, ground_truth: Any, meta: Mapping[str, Any]) -> dict[str, float]:
        return as_scores(self.fn(completion, ground_truth, **self._keywords(meta)), self.label)

    def score_batch(
        self, completions: Sequence[str], ground_truths: Sequence[Any], metas: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, float]]:
        out = self.fn(list(completions), list(ground_truths), [dict(m) for m in metas], **self.kwargs)
        if not isinstance(out, Sequence) or isinstance(out, (str, bytes, Mapping)) or len(out) != len(completions):
            size = len(out) if isinstance(out, Sequence) else type(out).__name__
            raise TypeError(f"batch reward {self.label!r} returned {size} results for {len(completions)} samples")
        return [as_scores(o, self.label) for o in out]

    def _keywords(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        keys = meta.keys() if self.accepts is None else self.accepts.intersection(meta)
        out = {k: meta[k] for k in keys if k not in self.positional and isinstance(k, str)}
        out.update(self.kwargs)
        return out


def load_reward(spec: RewardSpec | str) -> LoadedReward:
    """Resolve a reward by built-in name, ``file.py:function`` or entry point; raises ``RewardError`` saying why not."""
    spec = RewardSpec.coerce(spec)
    fn, default_label = _resolve(_canonical(spec.name))
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    kind = getattr(fn, "REWARD_TYPE", None) or getattr(module, "REWARD_TYPE", "sample")
    if kind not in ("sample", "batch"):
        raise RewardError(f"reward {spec.name!r}: REWARD_TYPE must be 'sample' or 'batch', got {kind!r}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise RewardError(f"reward {spec.name!r} is not a function with a signature: {fn!r}") from None
    n_positional = 3 if kind == "batch" else 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n_positional]
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    takes_positional = len(positional) == n_positional or any(p.kind is p.VAR_POSITIONAL for p in params)
    if not takes_positional:
        shape = "(completions, ground_truths, metas)" if kind == "batch" else "(completion, ground_truth, **meta)"
        raise RewardError(f"reward {spec.name!r} must take {shape}; its signature is {inspect.signature(fn)}")
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    keywords -= {p.name for p in positional}
    unknown = [k for k in spec.kwargs if not var_keyword and k not in keywords]
    if unknown:
        raise RewardError(
            f"reward {spec.name!r} does not take kwargs {unknown} (it takes: {', '.join(sorted(keywords)) or 'none'})"
        )
    return LoadedReward(
        label=spec.label or default_label,
        fn=fn,
        batch=kind == "batch",
        kwargs=dict(spec.kwargs),
        accepts=None if var_keyword else frozenset(keywords),
        positional=frozenset(p.name for p in positional),
    )


def _canonical(name: str) -> str:
    """Relative file paths are made absolute here, so parent and workers load the same file."""
    name = name.strip()
    file, sep, func = name.rpartition(":") if ":" in name else (name, "", "")
    if file.endswith(".py"):
        return f"{Path(file).expanduser().resolve()}:{func if sep else 'compute_score'}"
    return name


@cache
def _resolve(name: str) -> tuple[Callable[..., Any], str]:
    file, _, func = name.rpartition(":")
    if file.endswith(".py"):
        path = Path(file)
        if not path.is_file():
            raise RewardError(f"reward file not found: {path}")
        fn = getattr(_import_file(path), func, None)
        if not callable(fn):
            raise RewardError(f"reward file {path} has no function `{func}`")
        return fn, path.stem if func == "compute_score" else f"{path.stem}.{func}"
    if name in BUILTIN_REWARDS:
        return importlib.import_module(BUILTIN_REWARDS[name]).compute_score, name
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if found:
        try:
            target = found[0].load()
        except Exception as e:
            raise RewardError(f"reward entry point {name!r} ({found[0].value}) failed to load: {e!r}") from e
        fn = getattr(target, "compute_score", None) if isinstance(target, ModuleType) else target
        if not callable(fn):
            raise RewardError(f"reward entry point {name!r} ({found[0].value}) is not a function")
        return fn, name
    installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise RewardError(
        f"unknown reward {name!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}), not `path/to/file.py:function`, and "
        f"not an entry point in group '{ENTRY_POINT_GROUP}' (installed: {', '.join(installed) or 'none'})"
        + did_you_mean(name, [*BUILTIN_REWARDS, *installed])
    )


def _import_file(path: Path) -> ModuleType:
    stem = re.sub(r"\W", "_", path.stem)
    name = f"vlm_sapo_user_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"cannot import reward file {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it, as a normal import would (dataclasses and pickling need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardError(f"reward file {path} failed to import: {e!r}") from e
    return module


def as_scores(out: Any, label: str) -> dict[str, float]:
    """A reward's return value as ``{name: finite float}`` with ``overall``; a bare number means ``overall``."""
    if isinstance(out, (bool, int, float)):
        out = {"overall": out}
    if not isinstance(out, Mapping):
        raise TypeError(f"reward {label!r} returned {type(out).__name__}; expected a dict with an 'overall' score")
    if "overall" not in out:
        raise TypeError(f"reward {label!r} returned no 'overall' score (keys: {sorted(map(str, out))})")
    scores = {}
    for key, value in out.items():
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(f"reward {label!r}: score {key!r} = {value!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"reward {label!r}: score {key!r} is {number}")
        scores[str(key)] = number
    return scores


class InProcessScorer:
    """Scores as ``RewardPool.score`` does (``<label>/<key>`` scores, ``<label>/error`` 0, ``overall`` the weighted sum
    over the rewards that apply), in this process: no worker start-up, and no time limit or isolation either, so a
    reward that raises raises. For a few hundred samples of a trusted reward (the demo's before/after accuracy)."""

    def __init__(self, specs: Sequence[RewardSpec | str | Mapping[str, Any]]):
        self.specs = [RewardSpec.coerce(s) for s in specs]
        self.rewards = [load_reward(s) for s in self.specs]

    def score(self, items: Sequence[ScoreItem | tuple]) -> list[ScoreResult]:
        items = [ScoreItem(*item) for item in items]
        missing = sorted({item.task for item in items if not any(s.applies_to(item.task) for s in self.specs)})
        if missing:
            raise RewardError(f"no reward applies to task(s) {missing}")
        overall = [0.0] * len(items)
        scores: list[dict[str, float]] = [{} for _ in items]
        for spec, reward in zip(self.specs, self.rewards):
            chosen = [i for i, item in enumerate(items) if spec.applies_to(item.task)]
            if not chosen:
                continue
            if reward.batch:
                got = reward.score_batch(*([items[i][k] for i in chosen] for k in (2, 3, 4)))
            else:
                got = [reward.score_one(items[i].completion, items[i].ground_truth, items[i].meta) for i in chosen]
            for i, one in zip(chosen, got):
                scores[i].update({f"{reward.label}/{key}": value for key, value in one.items()})
                scores[i][f"{reward.label}/error"] = 0.0
                overall[i] += spec.weight * one["overall"]
        return [ScoreResult(o, s, None) for o, s in zip(overall, scores)]
