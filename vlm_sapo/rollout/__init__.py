"""Rollout engines: rendered prompts in, sampled token ids and their logprobs out (`hf` and `vllm` backends).

The engines import only leaves (`vlm_sapo.models`, `vlm_sapo.data.prompts`), never tasks, rewards or the learner.
Engines are registered by name (`register_engine`, `list_engines`) and built from their own recipe section
(`rollout.<backend>:`) plus an `EngineContext` (`build_engine`); see `vlm_sapo.rollout.registry`. Each engine's module
is imported on first use: importing vLLM takes seconds. The registry's names are imported on first access too, so
importing `vlm_sapo.rollout.hf_engine` needs no pydantic (scripts/gpu_check.py runs with torch and transformers only).
"""

from typing import Any

from vlm_sapo.rollout.types import (
    Completion,
    FinishReason,
    RolloutEngine,
    RolloutEngineError,
    Rollouts,
    RolloutTiming,
    SamplingConfig,
)

__all__ = [
    "Completion",
    "EngineContext",
    "FinishReason",
    "RolloutEngine",
    "RolloutEngineError",
    "RolloutTiming",
    "Rollouts",
    "SamplingConfig",
    "build_engine",
    "check_rollout",
    "engine_class",
    "engine_options",
    "list_engines",
    "register_engine",
    "unregister_engine",
]

_REGISTRY = {"EngineContext", "build_engine", "check_rollout", "engine_class", "engine_options", "list_engines",
             "register_engine", "unregister_engine"}


def __getattr__(name: str) -> Any:
    if name in _REGISTRY:
        from vlm_sapo.rollout import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
