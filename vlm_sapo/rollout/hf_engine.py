"""The transformers `generate` rollout engine: slow but exact, and able to sample from the learner's own module.

Logprobs are recorded inside generate by a logits processor that runs before temperature / top-k / top-p: it keeps
log_softmax(raw logits / T) of the step, reads off the sampled token's entry at the next step, and only then bans
the vision / unused tokens. So the reported logprobs are the temperature-only, full-vocabulary ones of
`vlm_sapo.rollout.types` (no [steps, batch, vocab] tensor is ever held, unlike `output_logits=True`).

The checkpoint's `generation_config` (Qwen ships repetition_penalty, top_k, temperature there) is swapped for a
neutral one during each call, so sampling is exactly `SamplingConfig` and nothing else.

Sampling without top-k/top-p (the RL default) draws the token inside that same processor, from the probabilities it
already has, by inverse CDF in two levels (`sample_categorical`), and hands generate a one-hot score to take
greedily. `torch.multinomial` draws one exponential variate per vocabulary entry (151,936 per row and step for Qwen),
which made it the largest single cost of a CPU rollout; one uniform per row gives the same distribution.

Sleep: an engine that owns its model (`from_pretrained`, `owns_model=True`) moves the weights to CPU memory in
`sleep()` and back in `wake()` (on CUDA; on CPU there is nothing to free). An engine on the learner's own module
offloads nothing: those weights are the ones being trained. generate holds no cache between calls.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlm_sapo.models.logprobs import unwrap_causal_lm
from vlm_sapo.models.rope import use_released_video_rope
from vlm_sapo.models.routing import compact, record_routing, routing_shape
from vlm_sapo.rollout.tokens import banned_token_ids, model_vocab_size, stop_token_ids
from vlm_sapo.rollout.types import (
    Completion,
    RolloutEngineError,
    Rollouts,
    RolloutTiming,
    SamplingConfig,
)
from vlm_sapo.rollout.weight_names import ParameterNames, checked_weights, parameter_names, require_complete

if TYPE_CHECKING:  # PIL: needed only where prompts are rendered, not by `generate_from_inputs`
    from vlm_sapo.data.prompts import RenderedPrompt

_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def collate_left(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad single-prompt processor outputs into one batch (generate appends on the right).

    Vision tensors (images, videos) are concatenated in row order, which is how Qwen-VL matches them to their tokens.
    """
    width = max(int(r["input_ids"].shape[-1]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in _TOKEN_KEYS:
        if key not in rows[0]:
            raise ValueError(f"processor output lacks {key!r} (keys: {sorted(rows[0])})")
        fill = pad_id if key == "input_ids" else 0
        batch = torch.full((len(rows), width), fill, dtype=rows[0][key].dtype)
        for b, r in enumerate(rows):
            x = r[key].reshape(-1)
            batch[b, width - len(x) :] = x
        out[key] = batch
    for key in _VISION_KEYS:
        parts = [r[key] for r in rows if r.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    unknown = {k for r in rows for k in r} - set(_TOKEN_KEYS) - set(_VISION_KEYS)
    if unknown:
        raise ValueError(f"processor output has keys the hf engine does not know how to batch: {sorted(unknown)}")
    return out


def sample_categorical(probs: torch.Tensor, block: int = 128) -> torch.Tensor:
    """One index per row of `probs` ([rows, V], >= 0, any positive total), drawn with probability probs / row total.

    Inverse CDF in two levels, with one float64 uniform per row from torch's default generator of that device: the
    block (of `block` entries) by the cumulative sums of block totals, then the entry by the cumulative sum inside that
    block. Exact in distribution up to float64 rounding; zero-probability entries are never drawn.
    """
    rows, vocab = probs.shape
    nb = -(-vocab // block)
    p = probs if nb * block == vocab else torch.nn.functional.pad(probs, (0, nb * block - vocab))
    p = p.view(rows, nb, block)
    cdf = p.sum(-1, dtype=torch.float64).cumsum_(-1)  # [rows, blocks]
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)  # first block whose cumulative total exceeds u
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(u))
    inner = p[torch.arange(rows, device=probs.device), b.squeeze(1)].to(torch.float64).cumsum_(-1)  # [rows, block]
    # Rounding may put u - before at or past the block's own total; below it, the first entry whose cumulative sum
    # exceeds it always has positive probability.
    top = torch.nextafter(inner[:, -1:], torch.zeros_like(u))
    rest = torch.minimum((u - before).clamp_(min=0.0), top)
    j = torch.searchsorted(inner, rest, right=True).clamp_(max=block - 1)
    return (b * block + j).squeeze(1)


class _TemperatureLogprobs:
    """Logits processor: records log_softmax(raw / T) of each sampled token, then bans `banned` ids.

    With `sample`, it also draws the next token from softmax(raw / T) over the allowed ids (what generate's
    temperature warper and multinomial would draw) and returns scores that make generate's greedy step pick it.
    """

    def __init__(self, temperature: float, banned: torch.Tensor, sample: bool = False):
        self.temperature = temperature
        self.banned = banned
        self.sample = sample
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:  # the token sampled at the previous step is now the last input id
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        z = scores.float()
        self.prev = torch.log_softmax(z if self.temperature == 1.0 else z / self.temperature, dim=-1)
        self.stamps.append(time.perf_counter())
        if self.banned.device != scores.device:
            self.banned = self.banned.to(scores.device)
        if self.sample:
            # Normalised over the allowed ids only (not exp(prev) with banned ids zeroed, which underflows to all
            # zeros when a banned token holds nearly all the mass), as generate's warper + softmax would.
            w = z / self.temperature if self.temperature != 1.0 else z.clone()
            w[:, self.banned] = float("-inf")
            token = sample_categorical(w.sub_(w.amax(-1, keepdim=True)).exp_())
            return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)
        scores = scores.clone()  # never write into the tensor generate handed us
        scores[:, self.banned] = float("-inf")
        return scores

    def logprobs(self, completion_ids: torch.Tensor) -> torch.Tensor:
        if self.prev is None:
            raise RuntimeError("generate produced no token")
        last = self.prev.gather(1, completion_ids[:, -1:]).squeeze(1)
        out = torch.stack([*self.steps, last], dim=1)
        if out.shape != completion_ids.shape:
            raise RuntimeError(f"recorded {out.shape[1]} logprob steps for {completion_ids.shape[1]} generated tokens")
        return out


def _fed_routing(calls: list[torch.Tensor], generated: torch.Size) -> torch.Tensor:
    """[rows, prompt + steps - 1, moe_layers, top_k] from generate's forwards: the prefill over the (left-padded)
    prompts, then one forward per generated token but the last."""
    rows, steps = generated
    if len(calls) != steps:
        raise RolloutEngineError(f"hf engine: recorded routing for {len(calls)} forwards but generate made {steps} "
                                 "tokens (one forward each)")
    return torch.cat([c.view(rows, -1, *c.shape[1:]) for c in calls], dim=1).cpu()


class _StopStrings:
    """Stopping criterion on the completion text only (as vLLM does), remembering where each row stopped."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = prompt_len
        # A stop string of c characters spans at most ~4c byte-level tokens; the window is generous on purpose.
        self.window = 8 * max(len(s) for s in stops) + 16
        self.hit_at: dict[int, int] = {}  # row -> completion length when a stop string was completed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        length = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = input_ids[:, start:].tolist()
        for r, tail in enumerate(tails):
            if r not in self.hit_at:
                text = self.tokenizer.decode(tail, skip_special_tokens=True)
                if any(s in text for s in self.stops):
                    self.hit_at[r] = length
            done[r] = r in self.hit_at
        return done


class HFRolloutEngine:
    """`RolloutEngine` on a transformers Qwen-VL model.

    `model` may be the learner's own module (no copy: then `update_weights` only checks names, since every tensor
    is already in place) or a separate copy (`from_pretrained`, or `owns_model=True`: then `sleep` offloads it).
    `max_batch_prompts` bounds how many prompts (each repeated n times) go through one generate call; None puts all
    of them in one. `tokenizer` defaults to the processor's; `processor` may be None for `generate_from_inputs`.
    `return_routed_experts` (MoE policies) records the experts the model's routers chose for every token it was fed,
    prompt and completion (`Completion.routed_experts`), from the router itself during generate.
    """

    name = "hf"
    Options = None  # `rollout.hf:` has no keys (and this module imports no pydantic: scripts/gpu_check.py)

    @classmethod
    def build(cls, options: Any, ctx: Any) -> HFRolloutEngine:
        """From `rollout.hf` and the run's `vlm_sapo.rollout.EngineContext` (the engine registry calls this): on the
        learner's own module when there is one and ZeRO < 3 leaves it whole, else on a copy of the checkpoint."""
        if ctx.policy is not None and ctx.zero_stage < 3:
            return cls(ctx.policy, ctx.processor, max_batch_prompts=ctx.max_batch_prompts,
                       return_routed_experts=ctx.return_routed_experts)
        return cls.from_pretrained(ctx.model_path, ctx.processor, dtype=ctx.dtype,
                                   max_batch_prompts=ctx.max_batch_prompts,
                                   return_routed_experts=ctx.return_routed_experts)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        max_batch_prompts: int | None = None,
        extra_banned_ids: Iterable[int] = (),
        owns_model: bool = False,
        tokenizer: Any = None,
        return_routed_experts: bool = False,
    ):
        if max_batch_prompts is not None and max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts must be >= 1 or None, got {max_batch_prompts}")
        self.model = unwrap_causal_lm(model)
        use_released_video_rope(self.model)  # generate() places text after a video as vLLM and the learner do
        self.return_routed_experts = return_routed_experts
        if return_routed_experts:
            self.num_experts = routing_shape(self.model)[2]  # refuses a dense model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        vocab = model_vocab_size(self.model.config)
        self.banned_ids = banned_token_ids(self.tokenizer, vocab, extra_banned_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.label = f"hf engine ({getattr(self.model, 'name_or_path', '') or type(self.model).__name__})"
        self.weight_version = 0
        self.owns_model = owns_model
        self._names: ParameterNames | None = None
        self._closed = False
        self._asleep_from: torch.device | None = None  # the device the weights went back to CPU from
        self._asleep = False

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, processor: Any = None, *, dtype: str = "auto", device: str | None = None,
        **kwargs: Any,
    ) -> HFRolloutEngine:
        """An engine with its own copy of the checkpoint (then `update_weights` copies tensors into it)."""
        from vlm_sapo.models.loading import load_policy, load_processor

        model = load_policy(path, dtype=dtype, device=device)  # type: ignore[arg-type]
        return cls(model, processor if processor is not None else load_processor(path), owns_model=True, **kwargs)

    # -- generation ---------------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RolloutEngineError(f"{self.label} is closed")
        if self._asleep:
            raise RolloutEngineError(f"{self.label} is asleep; call wake() first")

    def generate(self, prompts: Sequence[RenderedPrompt], n: int, sampling: SamplingConfig) -> Rollouts:
        from vlm_sapo.data.prompts import prompt_model_inputs

        self._check_usable()
        t0 = time.perf_counter()
        inputs = [prompt_model_inputs(self.processor, p) for p in prompts]
        return self.generate_from_inputs(inputs, [p.id for p in prompts], n, sampling, _t0=t0)

    def generate_from_inputs(self, inputs: Sequence[dict[str, Any]], ids: Sequence[str], n: int,
                             sampling: SamplingConfig, *, _t0: float | None = None) -> Rollouts:
        """`generate` on prompts already through the processor (one dict of batch-1 tensors per prompt, as
        `prompt_model_inputs` returns), named by `ids`."""
        self._check_usable()
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        if len(inputs) != len(ids):
            raise ValueError(f"{len(inputs)} prompt inputs but {len(ids)} ids")
        t0 = time.perf_counter() if _t0 is None else _t0
        step = self.max_batch_prompts or max(len(inputs), 1)
        completions: list[Completion] = []
        prompt_tokens = 0
        for start in range(0, len(inputs), step):
            done, tokens = self._generate_chunk(list(inputs[start : start + step]), list(ids[start : start + step]),
                                                start, n, sampling, t0)
            completions += done
            prompt_tokens += tokens
        seconds = time.perf_counter() - t0
        timing = RolloutTiming(seconds, prompt_tokens, sum(len(c.completion_ids) for c in completions))
        return Rollouts(completions, n, timing, self.name, self.weight_version, sampling)

    def _generate_chunk(
        self, per_prompt: list[dict[str, Any]], sample_ids: list[str], first_index: int, n: int, sampling: SamplingConfig,
        t0: float,
    ) -> tuple[list[Completion], int]:
        """One `generate` call for a chunk of prompts x n. Kept in one piece (over 80 lines) on purpose: the token ids,
        the per-token logprobs, the stop handling and the recorded routed experts all read the same generate output,
        and splitting them would pass that output through four signatures."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        device = next(self.model.parameters()).device
        batch = collate_left([inp for inp in per_prompt for _ in range(n)], self.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        prompt_len = int(batch["input_ids"].shape[1])

        # Plain temperature sampling is drawn by the recorder itself (see the module docstring); top-k / top-p stay
        # with generate's own warpers and multinomial.
        own_sampler = not sampling.greedy and sampling.top_p >= 1.0 and sampling.top_k_or_none is None
        warp = not sampling.greedy and not own_sampler
        recorder = _TemperatureLogprobs(sampling.logprob_temperature, torch.tensor(self.banned_ids),
                                        sample=own_sampler)
        stops = _StopStrings(self.tokenizer, sampling.stop, prompt_len) if sampling.stop else None
        config = GenerationConfig(
            do_sample=warp,
            temperature=sampling.temperature if warp else None,
            top_p=sampling.top_p if warp else None,
            top_k=(sampling.top_k_or_none or 0) if warp else None,  # None would mean transformers' 50
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        saved_config, was_training = self.model.generation_config, self.model.training
        devices = [device] if device.type == "cuda" else []
        try:
            self.model.generation_config = GenerationConfig()  # nothing of the checkpoint's sampling defaults leaks
            self.model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed + first_index)
                with record_routing(self.model) if self.return_routed_experts else contextlib.nullcontext() as rec:
                    out = self.model.generate(
                        **batch,
                        generation_config=config,
                        logits_processor=LogitsProcessorList([recorder]),
                        stopping_criteria=StoppingCriteriaList([stops] if stops else []),
                    )
        except Exception as err:
            raise RolloutEngineError(f"{self.label}: generate failed on prompts "
                                     f"{sample_ids[:8]}: {type(err).__name__}: {err}") from err
        finally:
            self.model.generation_config = saved_config
            self.model.train(was_training)

        generated = out[:, prompt_len:]
        logprobs = recorder.logprobs(generated).cpu()
        routed = _fed_routing(rec.calls, generated.shape) if self.return_routed_experts else None
        rows = generated.tolist()
        stop_set = set(self.stop_ids)
        completions = []
        for r, ids in enumerate(rows):
            p, k = divmod(r, n)
            end = next((j + 1 for j, t in enumerate(ids) if t in stop_set), None)
            if stops is not None and r in stops.hit_at:
                end = min(end or len(ids), stops.hit_at[r])
            if end is None:
                if len(ids) != sampling.max_new_tokens:
                    raise RolloutEngineError(f"{self.label}: row {r} neither stopped nor reached max_new_tokens "
                                             f"({len(ids)} of {sampling.max_new_tokens} tokens)")
                end, reason = len(ids), "length"
            else:
                reason = "stop"
            lp = logprobs[r, :end].contiguous()
            if not torch.isfinite(lp).all():
                raise RolloutEngineError(f"{self.label}: non-finite logprob in sample {sample_ids[p]!r} "
                                         "(NaN/inf weights or logits?)")
            completions.append(Completion(
                prompt_index=first_index + p,
                sample_index=k,
                sample_id=sample_ids[p],
                prompt_ids=per_prompt[p]["input_ids"][0].tolist(),
                completion_ids=ids[:end],
                logprobs=lp,
                finish_reason=reason,
                text=self.tokenizer.decode(ids[:end], skip_special_tokens=True),
                finish_s=recorder.stamps[end - 1] - t0,
                routed_experts=None if routed is None else compact(
                    routed[r, prompt_len - len(per_prompt[p]["input_ids"][0]) : prompt_len + end - 1],
                    self.num_experts),
            ))
        return completions, sum(int(x["input_ids"].shape[-1]) for x in per_prompt)

    # -- weights and lifecycle ------------------------------------------------------------------------------------

    @property
    def shares_weights(self) -> bool:
        """True on a module the engine does not own (the learner's): its weights are the trained ones, no sync."""
        return not self.owns_model

    def inject_death(self, message: str) -> None:
        raise NotImplementedError(f"{message}: the engine_death fault needs rollout.backend=vllm (the hf engine runs "
                                  "in the trainer's own forward; there is no engine to crash from inside)")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every parameter into the model (skipped for tensors that already are the model's own storage)."""
        self._check_usable()
        if self._names is None:
            self._names = parameter_names(self.model)
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers())
        seen: set[int] = set()
        with torch.no_grad():
            for name, tensor in checked_weights(named_tensors, self._names, seen, self.label):
                target = targets[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)
        require_complete(self._names, seen, self.label, "The model now holds a mix of old and new weights.")
        self.weight_version += 1

    def sleep(self) -> None:
        """Offload an owned model's weights to CPU memory (CUDA only); the learner's own module stays (see module
        docstring). `generate` and `update_weights` refuse until `wake`."""
        self._check_usable()
        device = next(self.model.parameters()).device
        if self.owns_model and device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self._asleep_from = device
        self._asleep = True

    def wake(self) -> None:
        if self._closed:
            raise RolloutEngineError(f"{self.label} is closed")
        if self._asleep_from is not None:
            self.model.to(self._asleep_from)
            self._asleep_from = None
        self._asleep = False

    def close(self) -> None:
        self._closed = True
        self.model = None
