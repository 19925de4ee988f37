"""What every rollout engine takes and returns: `SamplingConfig` in, `Rollouts` out, one `RolloutEngine` protocol.

The logprob definition both engines share (and the learner recomputes with `token_logprobs(..., temperature=T)`):

    logprobs[j] = log_softmax(logits_j / T)[completion_ids[j]]    in fp32, over the FULL vocabulary

where `logits_j` are the model's raw logits before any sampling processor. So top-k / top-p truncation and the
banned (vision, unused) tokens change which token is sampled but never the reported logprob: it is the
temperature-only distribution, exactly what the learner's forward scores. At `temperature == 0` (greedy) the
reported logprobs are those of T = 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch

if TYPE_CHECKING:
    from vlm_sapo.data.prompts import RenderedPrompt

FinishReason = Literal["stop", "length"]


class RolloutEngineError(RuntimeError):
    """A rollout engine failed or died; the message names the engine. A dead engine must be rebuilt."""


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings for one `generate` call.

    `top_k` 0 (or -1) and `top_p` 1.0 disable truncation. `stop` strings end a completion on the token that
    completes them (that token is kept); `<|im_end|>` and the checkpoint's eos ids always stop. `seed` makes a call
    reproducible on one engine (vLLM: one stream per prompt); the two engines never draw the same samples, and a
    trainer should pass a different seed each step (or None) so steps do not repeat each other's draws.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (0 or -1: off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T of the reported logprobs (and of the learner's recomputation): the sampling T, or 1 when greedy."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k > 0 else None


@dataclass
class Completion:
    """One sampled completion. `logprobs` (fp32, CPU) has one entry per completion token; see the module docstring.

    `completion_ids` end with the stop token (`<|im_end|>`, or the token that completed a stop string) when
    `finish_reason == "stop"`. `text` is their decoding without special tokens. `finish_s` is the time from the start
    of the `generate` call until this completion's last token (vLLM: until its prompt's group finished).
    `routed_experts` (MoE policies, when the engine was asked to record them): the experts the engine routed each
    token to, [len(prompt_ids) + len(completion_ids) - 1, moe_layers, top_k] (uint8), for every token the engine fed
    to the model (the last completion token never is).
    """

    prompt_index: int
    sample_index: int
    sample_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: FinishReason
    text: str
    finish_s: float
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logprobs.dtype != torch.float32 or self.logprobs.shape != (len(self.completion_ids),):
            raise ValueError(f"sample {self.sample_id!r}: logprobs must be fp32 of shape ({len(self.completion_ids)},),"
                             f" got {self.logprobs.dtype} {tuple(self.logprobs.shape)}")
        fed = len(self.prompt_ids) + len(self.completion_ids) - 1
        if self.routed_experts is not None and (self.routed_experts.dim() != 3 or self.routed_experts.shape[0] != fed):
            raise ValueError(f"sample {self.sample_id!r}: routed_experts must be [{fed}, moe_layers, top_k] (prompt + "
                             f"completion - 1 tokens), got {tuple(self.routed_experts.shape)}")


@dataclass
class RolloutTiming:
    """Wall-clock of one `generate` call; throughput counts generated (completion) tokens only."""

    seconds: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {
            f"{prefix}seconds": self.seconds,
            f"{prefix}tokens_per_s": self.tokens_per_s,
            f"{prefix}prompt_tokens": float(self.prompt_tokens),
            f"{prefix}completion_tokens": float(self.completion_tokens),
        }


@dataclass
class Rollouts:
    """`completions` are prompt-major: prompt 0's `group_size` samples, then prompt 1's, ... (flat, for a trainer)."""

    completions: list[Completion]
    group_size: int
    timing: RolloutTiming
    engine: str
    weight_version: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.group_size < 1 or len(self.completions) % self.group_size:
            raise ValueError(f"{len(self.completions)} completions do not split into groups of {self.group_size}")
        for k, c in enumerate(self.completions):
            if (c.prompt_index, c.sample_index) != divmod(k, self.group_size):
                raise ValueError(f"completion {k} is (prompt {c.prompt_index}, sample {c.sample_index}); "
                                 "expected prompt-major order")

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def num_prompts(self) -> int:
        return len(self.completions) // self.group_size

    def groups(self) -> list[list[Completion]]:
        g = self.group_size
        return [self.completions[i : i + g] for i in range(0, len(self.completions), g)]

    def finish_reason_counts(self) -> dict[str, int]:
        counts = {"stop": 0, "length": 0}
        for c in self.completions:
            counts[c.finish_reason] += 1
        return counts


class RolloutEngine(Protocol):
    """Sampling backends the trainer and the evaluator drive: `hf` (transformers generate), `vllm`, or any engine
    registered with `vlm_sapo.rollout.register_engine` (which also wants `Options` and `build`, see there).

    `shares_weights`: the engine samples with the learner's own tensors, so the trainer pushes no weights into it.
    `inject_death(message)` (tests' `engine_death` fault) makes every later call fail as a crashed engine would; an
    engine that cannot raises `NotImplementedError`.
    """

    name: str
    shares_weights: bool

    def generate(self, prompts: Sequence[RenderedPrompt], n: int, sampling: SamplingConfig) -> Rollouts: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...

    def inject_death(self, message: str) -> None: ...
