"""What an evaluation is configured by: `EvalConfig` for `evaluate` (given an engine), `EvalRun` for `run_eval`
(`vlm-sapo eval`: one field per command-line flag)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_sapo.rollout import SamplingConfig


def _greedy() -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=1024)


@dataclass(frozen=True)
class EvalConfig:
    """How `evaluate` renders, samples and scores. `family` picks the grounding units unless `coord_system` is given;
    `limit` caps the rows of benchmarks given by name (from `data_root`); prompts over `max_prompt_tokens` are counted
    in `dropped`, not evaluated; the rewards run in `reward_workers` processes, `reward_timeout_s` per call, unless
    `evaluate` is given a pool."""

    family: str
    n: int = 1
    sampling: SamplingConfig = field(default_factory=_greedy)
    limit: int | None = None
    data_root: str | os.PathLike | None = None
    max_prompt_tokens: int | None = None
    system: str | None = None
    coord_system: str | None = None
    batch_prompts: int = 16
    reward_workers: int = 2
    reward_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_prompts < 1:
            raise ValueError(f"batch_prompts must be >= 1, got {self.batch_prompts}")


@dataclass(frozen=True)
class EvalRun:
    """`vlm-sapo eval`: a model folder, benchmark names, and how to run them (the command's flags, same defaults).

    `temperature` None means greedy for n = 1 and 1.0 for n > 1 (pass@k needs different samples)."""

    model: str | os.PathLike
    benchmarks: tuple[str, ...]
    backend: str = "vllm"
    n: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_max_pixels: int | None = None
    video_max_frames: int | None = None
    video_fps: float | None = None
    limit: int | None = None
    data_root: str | os.PathLike | None = None
    out_dir: str | os.PathLike | None = None
    seed: int = 0
    dtype: str = "auto"
    coord_system: str | None = None
    system: str | None = None
    batch_prompts: int = 16
    reward_workers: int = 2
    reward_timeout_s: float = 10.0
    engine_options: Mapping[str, Any] | None = None  # the backend's own options, as a recipe's `rollout.<backend>:`
    progress: bool = True

    def sampling(self) -> SamplingConfig:
        temperature = (0.0 if self.n == 1 else 1.0) if self.temperature is None else self.temperature
        return SamplingConfig(temperature=temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              seed=self.seed)

    def config(self, family: str) -> EvalConfig:
        return EvalConfig(family=family, n=self.n, sampling=self.sampling(), limit=self.limit,
                          data_root=self.data_root, max_prompt_tokens=self.max_prompt_tokens, system=self.system,
                          coord_system=self.coord_system, batch_prompts=self.batch_prompts,
                          reward_workers=self.reward_workers, reward_timeout_s=self.reward_timeout_s)
