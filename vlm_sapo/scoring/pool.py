"""The isolating reward pool: rewards scored in worker processes under a hard time limit per call.

Why worker processes: a reward can hang inside C code (sympy on a huge integer power) where no Python time-out fires,
and math-verify's own time-out (``signal.alarm``) only works on a main thread. A worker past its limit is killed and
replaced; one that dies (``os._exit``, a segfault) is replaced; the sample scores 0 for that reward, the failure is
counted and logged with the sample id, and the run goes on. Only a reward that fails on every sample of a call raises.

Workers are fresh interpreters (``python -c``, talking over a socket pair), not ``fork``/``spawn`` children: forking
the trainer, which holds torch and vLLM threads, can deadlock the child, and ``spawn`` would re-import the trainer's
main script (torch included) into every worker. A fresh worker starts in about half a second. Which rewards exist and
how they are loaded is ``vlm_sapo.scoring.rewards``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from vlm_sapo.scoring.rewards import RewardError, RewardSpec, ScoreItem, ScoreResult, load_reward

logger = logging.getLogger("vlm_sapo.rewards")

_MAX_ERROR_CHARS = 500


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


_WORKER_CMD = "import sys; from vlm_sapo.scoring.pool import _worker_main; _worker_main(int(sys.argv[1]))"


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
        package_root = str(Path(__file__).resolve().parents[2])
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
