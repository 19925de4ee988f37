"""What both sides of `vs_trl.py` share: the work (one `Work` of settings), its fixtures, and the worker protocol.

The fixtures (a tiny random Qwen2.5-VL with the real 151,936-token vocabulary and synthetic math rows) are built once
under `benchmarks/.cache/` with the project's own builders. Each side runs in its own process and steps only when the
driver says so: it reads a line from stdin, runs one RL step, and prints one result line starting with `RESULT_TAG`
(anything else the libraries print is ignored).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
RESULT_TAG = "@@BENCH "


@dataclass(frozen=True)
class Work:
    """One RL step's work, identical on both sides."""

    prompts: int = 2  # prompts per step
    g: int = 4  # completions per prompt
    max_new_tokens: int = 32
    max_prompt_tokens: int = 1024
    min_pixels: int = 3136
    max_pixels: int = 12544
    mini_batches: int = 1  # optimizer steps per rollout batch (1: on-policy, old = detached current)
    temperature: float = 1.0
    lr: float = 1e-6
    seed: int = 0
    task: str = "math"
    backend: str = "hf"  # hf | vllm

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Work:
        return cls(**json.loads(text))


def fixtures(n_rows: int = 256) -> tuple[Path, Path]:
    """(tiny model folder, math rows jsonl), built on first use."""
    model, data = CACHE / "tiny_qwen2_5_vl", CACHE / "synthetic"
    if not (model / "config.json").is_file():
        from vlm_sapo.models.tiny import build_tiny

        build_tiny(model, family="qwen2_5_vl")
    rows = data / "math" / "train.jsonl"
    if not rows.is_file():
        from vlm_sapo.demo.synthetic import make_synthetic_data

        make_synthetic_data(data, seed=0, n_train=n_rows, n_val=1, n_test=1, families=("math",))
    return model, rows


def _hwm_mb(pid: int | str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set (VmHWM) of this process plus that of each live child (reward workers, engine processes), MB."""
    total = _hwm_mb("self") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    me = str(os.getpid())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:  # field 4: the parent's pid
                total += _hwm_mb(proc.name)
        except (OSError, IndexError):
            continue
    return total


def wait_for_go() -> bool:
    """Block until the driver asks for a step; False when it says stop (or closed the pipe)."""
    line = sys.stdin.readline()
    return line.strip() == "go"


def report(**values: Any) -> None:
    values["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(RESULT_TAG + json.dumps(values) + "\n")
    sys.stdout.flush()


def cpu_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a worker process: CPU DeepSpeed, offline hub, and the same thread count on both sides."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env
