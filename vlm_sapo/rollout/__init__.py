"""Rollout engines: rendered prompts in, sampled token ids and their logprobs out (`hf` and `vllm` backends).

The engines import only leaves (`vlm_sapo.models`, `vlm_sapo.data.prompts`), never tasks, rewards or the learner.
`VLLMRolloutEngine` is imported lazily (`vlm_sapo.rollout.vllm_engine`): importing vLLM takes seconds.
"""

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
    "FinishReason",
    "RolloutEngine",
    "RolloutEngineError",
    "RolloutTiming",
    "Rollouts",
    "SamplingConfig",
]
