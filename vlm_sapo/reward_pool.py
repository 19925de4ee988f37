"""Rewards named by a recipe, scored in worker processes under a hard time limit per call.

A reward is named by a built-in name (``math``, ``grounding``, ``chart``, ``motion``, ``format``), by ``path/to/file.py:function``
(``path/to/file.py`` alone means its ``compute_score``), or by an entry point installed in group ``vlm_sapo.rewards``;
nothing else is ever imported. A reward module may set ``REWARD_TYPE = "batch"``: its function then takes
``(completions, ground_truths, metas, **kwargs)`` and returns one dict per sample.

Why worker processes: a reward can hang inside C code (sympy on a huge integer power) where no Python time-out fires,
and math-verify's own time-out (``signal.alarm``) only works on a main thread. A worker past its limit is killed and
replaced; one that dies (``os._exit``, a segfault) is replaced; the sample scores 0 for that reward, the failure is
counted and logged with the sample id, and the run goes on. Only a reward that fails on every sample of a call raises.

Workers are fresh interpreters (``python -c``, talking over a socket pair), not ``fork``/``spawn`` children: forking
the trainer, which holds torch and vLLM threads, can deadlock the child, and ``spawn`` would re-import the trainer's
main script (torch included) into every worker. A fresh worker starts in about half a second.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from vlm_sapo.suggest import did_you_mean

logger = logging.getLogger("vlm_sapo.rewards")

ENTRY_POINT_GROUP = "vlm_sapo.rewards"
BUILTIN_REWARDS = {
    "math": "rewards.math",
    "grounding": "rewards.grounding",
    "chart": "rewards.chart",
    "motion": "rewards.motion",
    "format": "rewards.format",
}
_MAX_ERROR_CHARS = 500


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


# -------------------------------------------------------------------------------------------------------- worker
def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]


def _worker_main(fd: int) -> None:
    """Worker loop: receive (job id, reward index, payload), reply (job id, scores, error). Runs on the main thread,
    so math-verify's ``signal.alarm`` works here too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    conn = Connection(fd)
    try:
        sys_path, specs, memory_limit_mb = conn.recv()
    except (EOFError, OSError):
        return
    sys.path[:] = sys_path
    if memory_limit_mb:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        rewards = [load_reward(spec) for spec in specs]
    except BaseException as e:
        conn.send(("init_error", _describe(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, index, payload = message
        try:
            reward = rewards[index]
            reply = (job_id, reward.score_batch(*payload) if reward.batch else reward.score_one(*payload), None)
        except BaseException as e:  # SystemExit too: a reward calling sys.exit() fails its sample, not the worker
            reply = (job_id, None, _describe(e))
        conn.send(reply)


_WORKER_CMD = "import sys; from vlm_sapo.reward_pool import _worker_main; _worker_main(int(sys.argv[1]))"


@dataclass
class _Job:
    id: int
    reward: int
    items: list[int]
    payload: tuple
    attempts: int = 0


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    deadline: float  # start-up deadline while not ready, then the running job's
    ready: bool = False
    job: _Job | None = None


def _stop(worker: _Worker) -> None:
    try:
        worker.conn.close()
    except OSError:
        pass
    if worker.proc.poll() is None:
        worker.proc.kill()
    try:
        worker.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.error("reward worker %d did not exit after SIGKILL", worker.proc.pid)


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _stop(worker)
    workers.clear()


# ---------------------------------------------------------------------------------------------------------- pool
class RewardPool:
    """Score completions with every reward that applies to each sample's task, in ``workers`` processes.

    ``timeout_s`` bounds each call (one sample, or a whole batch for a batched reward). ``memory_limit_mb`` caps each
    worker's address space (``RLIMIT_AS``) so a runaway reward raises ``MemoryError`` instead of starving the trainer;
    a reward that imports torch needs about 3.5 GB of it. Counters: ``failures`` (exceptions, bad return values, dead
    workers) and ``timeouts``, both per sample, and ``restarts`` (workers replaced).
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | Mapping[str, Any]],
        workers: int = 2,
        timeout_s: float = 10.0,
        *,
        memory_limit_mb: int | None = 8192,
        start_timeout_s: float = 120.0,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.specs = [RewardSpec.coerce(s) for s in specs]
        if not self.specs:
            raise RewardError("no rewards given (vlm_sapo.tasks.default_reward_specs gives each task its own)")
        self.rewards = [load_reward(s) for s in self.specs]  # fail here, in the trainer, with the clear message
        labels = Counter(r.label for r in self.rewards)
        if any(n > 1 for n in labels.values()):
            clashes = "; ".join(
                f"label {label!r} is taken by entries "
                + ", ".join(f"[{i}] `{s.name}`" for i, (s, r) in enumerate(zip(self.specs, self.rewards))
                            if r.label == label)
                for label, n in labels.items() if n > 1)
            dup = sorted(label for label, n in labels.items() if n > 1)
            raise RewardError(f"rewards share the label(s) {dup} ({clashes}); labels in use: {sorted(labels)}. Give "
                              f"all but one a distinct `label` (in a recipe: rewards.functions[i].label)")
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.failures = self.timeouts = self.restarts = 0
        self._next_job = 0
        self._failed_starts = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for _ in range(workers):
            self._workers.append(self._start())

    # ---------------------------------------------------------------------------------------------- public
    def validate_tasks(self, tasks: Sequence[str]) -> None:
        """Raise when some task would get no reward at all (its samples would silently score 0)."""
        missing = sorted({t for t in tasks if not any(s.applies_to(t) for s in self.specs)})
        if missing:
            raise RewardError(f"no reward applies to task(s) {missing}; check the `tasks` filters of rewards.functions")

    def score(self, items: Sequence[ScoreItem | tuple]) -> list[ScoreResult]:
        if self._finalizer.alive is False:
            raise RewardError("the reward pool is closed")
        items = [ScoreItem(*item) for item in items]
        if not items:
            return []
        self.validate_tasks([item.task for item in items])
        jobs = self._jobs(items)
        outcomes = self._run(jobs)
        return self._collect(items, jobs, outcomes)

    def stats(self) -> dict[str, int]:
        return {"failures": self.failures, "timeouts": self.timeouts, "restarts": self.restarts}

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------- workers
    def _start(self) -> _Worker:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        conn = Connection(parent.detach())
        conn.send((list(sys.path), self.specs, self.memory_limit_mb))
        return _Worker(proc, conn, deadline=time.monotonic() + self.start_timeout_s)

    def _replace(self, index: int) -> None:
        _stop(self._workers[index])
        self._workers[index] = self._start()
        self.restarts += 1

    # -------------------------------------------------------------------------------------------- scoring
    def _jobs(self, items: list[ScoreItem]) -> list[_Job]:
        jobs = []
        for r, (spec, reward) in enumerate(zip(self.specs, self.rewards)):
            chosen = [i for i, item in enumerate(items) if spec.applies_to(item.task)]
            if not chosen:
                continue
            if reward.batch:
                payload = tuple([items[i][k] for i in chosen] for k in (2, 3, 4))
                jobs.append(_Job(self._new_id(), r, chosen, payload))
            else:
                for i in chosen:
                    jobs.append(
                        _Job(self._new_id(), r, [i], (items[i].completion, items[i].ground_truth, items[i].meta))
                    )
        return jobs

    def _new_id(self) -> int:
        self._next_job += 1
        return self._next_job

    def _run(self, jobs: list[_Job]) -> dict[int, tuple[Any, str | None, bool]]:
        """Run every job; the outcome of each is (scores, error, timed_out)."""
        queue: deque[_Job] = deque(jobs)
        outcomes: dict[int, tuple[Any, str | None, bool]] = {}
        while queue or any(w.job is not None for w in self._workers):
            for k, worker in enumerate(self._workers):
                if worker.ready and worker.job is None and queue:
                    self._dispatch(k, queue.popleft(), queue, outcomes)
            waiting = [k for k, w in enumerate(self._workers) if w.job is not None or not w.ready]
            if not waiting:
                continue
            timeout = max(0.0, min(self._workers[k].deadline for k in waiting) - time.monotonic())
            ready = wait([self._workers[k].conn for k in waiting], timeout)
            for k in waiting:
                if self._workers[k].conn in ready:
                    self._receive(k, outcomes)
            now = time.monotonic()
            for k in waiting:
                worker = self._workers[k]
                if (worker.job is not None or not worker.ready) and now >= worker.deadline:
                    self._expire(k, outcomes)
        return outcomes

    def _dispatch(self, k: int, job: _Job, queue: deque[_Job], outcomes: dict) -> None:
        worker = self._workers[k]
        try:
            worker.conn.send((job.id, job.reward, job.payload))
        except OSError:  # the worker died while idle: not the job's fault, so try it on a fresh one
            job.attempts += 1
            if job.attempts < 3:
                queue.appendleft(job)
            else:
                outcomes[job.id] = (None, "could not reach a reward worker", False)
            self._replace(k)
            return
        except Exception as e:  # the sample itself cannot be pickled
            outcomes[job.id] = (None, f"could not send the sample to a worker: {_describe(e)}", False)
            return
        worker.job, worker.deadline = job, time.monotonic() + self.timeout_s

    def _receive(self, k: int, outcomes: dict) -> None:
        worker = self._workers[k]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.proc.poll()
            if code is None:
                try:
                    code = worker.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = "unknown"
            if worker.job is not None:
                outcomes[worker.job.id] = (None, f"reward worker died (exit code {code})", False)
            elif not worker.ready:
                self._failed_starts += 1
                if self._failed_starts >= 3:
                    raise RewardError(
                        f"reward workers keep dying while starting (exit code {code}); see stderr"
                    ) from None
            self._replace(k)
            return
        if not worker.ready:
            kind, detail = message
            if kind != "ready":
                raise RewardError(f"a reward worker could not load the rewards: {detail}")
            worker.ready, worker.deadline, self._failed_starts = True, math.inf, 0
            return
        job_id, scores, error = message
        outcomes[job_id] = (scores, error, False)
        worker.job, worker.deadline = None, math.inf

    def _expire(self, k: int, outcomes: dict) -> None:
        worker = self._workers[k]
        if worker.job is None:
            raise RewardError(f"a reward worker did not start within {self.start_timeout_s:.0f} s")
        outcomes[worker.job.id] = (None, f"timed out after {self.timeout_s:g} s", True)
        self._replace(k)

    def _collect(self, items: list[ScoreItem], jobs: list[_Job], outcomes: dict) -> list[ScoreResult]:
        overall = [0.0] * len(items)
        scores: list[dict[str, float]] = [{} for _ in items]
        errors: list[list[str]] = [[] for _ in items]
        seen, failed = Counter(), Counter()
        first_error: dict[int, str] = {}
        for job in jobs:
            result, error, timed_out = outcomes[job.id]
            spec, label = self.specs[job.reward], self.rewards[job.reward].label
            per_item = result if self.rewards[job.reward].batch else [result]
            for pos, i in enumerate(job.items):
                seen[job.reward] += 1
                if error is not None:
                    failed[job.reward] += 1
                    sid = items[i].sample_id
                    first_error.setdefault(job.reward, f"sample {sid}: {error}")
                    if timed_out:
                        self.timeouts += 1
                    else:
                        self.failures += 1
                    logger.warning("reward %r scored 0 on sample %s (task %s): %s", label, sid, items[i].task, error)
                    scores[i][f"{label}/overall"] = 0.0
                    scores[i][f"{label}/error"] = 1.0
                    errors[i].append(f"{label}: {error}")
                    continue
                for key, value in per_item[pos].items():
                    scores[i][f"{label}/{key}"] = value
                scores[i][f"{label}/error"] = 0.0
                overall[i] += spec.weight * per_item[pos]["overall"]
        for r, n in seen.items():
            if failed[r] == n:
                raise RewardError(
                    f"reward {self.rewards[r].label!r} failed on all {n} sample(s) of this call; first: {first_error[r]}"
                )
        return [ScoreResult(o, s, "; ".join(e) or None) for o, s, e in zip(overall, scores, errors)]
