"""Helpers of the reliability tests: `vlm-sapo train` as a subprocess with faults injected, and what it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "geometry3k" / "rows.jsonl"
FIXTURE_DIR = FIXTURE.parent
TRAIN = [sys.executable, "-m", "vlm_sapo.cli", "train", "recipes/smoke_cpu.yaml"]
FAST = ["rollout.max_new_tokens=8", "rollout.n=2", "data.prompts_per_step=2", "algorithm.mini_batches=1",
        "logging.tensorboard=false", "logging.progress=false", "checkpoint.export_hf=false"]
TAG = "VLM_SAPO_TEST_TAG"  # set in a run's environment, so every process it starts (reward workers) can be found


def fixture_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expected_batches(ids: list[str], steps: int, per_step: int = 2, skip: frozenset[str] = frozenset()
                     ) -> list[list[str]]:
    """The data order from the sampler alone over the usable rows in file order; a sample in `skip` (found bad when
    its prompt is rendered) is replaced by the next one drawn."""
    from vlm_sapo.data.mix import TaskMixSampler

    sampler = TaskMixSampler([len(ids)], [1.0], seed=0, shuffle=True)
    out = []
    for _ in range(steps):
        batch: list[str] = []
        while len(batch) < per_step:
            ((_, i),) = sampler.next_batch(1)
            if ids[i] not in skip:
                batch.append(ids[i])
        out.append(batch)
    return out


def train_args(run_dir: Path, model: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [*TRAIN, f"model.path={model}", f"logging.dir={run_dir}", *FAST, *overrides]
    return cmd + (["--resume"] if resume else ["checkpoint.resume=never"])


def run_env(tag: str, fault: str = "", **extra: str) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", TAG: tag, "VLM_SAPO_FAULT": fault, **extra}
    for var in ("VLM_SAPO_ENGINE_RESTARTS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a run gets its own one-process group, as from a shell
    return env


def start(cmd: list[str], env: dict[str, str], log: Path, **popen: Any) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    """Wait (bounded) for a run; a run past `timeout` is killed and reported as hanging."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log.read_text()[-3000:]
        raise AssertionError(f"run hung: no exit within {timeout:.0f} s; log tail:\n{tail}") from None
    return rc, log.read_text(errors="replace")


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300, **popen: Any) -> tuple[int, str]:
    return finish(start(cmd, env, log, **popen), log, timeout)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `TAG=tag` (the trainer, its reward workers, anything they started)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # a zombie has already exited
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for_no_processes(tag: str, timeout: float = 15.0) -> list[int]:
    """[] once no process of the run is alive (orphaned reward workers must exit by themselves), else the pids."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in metrics(run_dir)]


def checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
