"""The policy learner: a Qwen-VL model under DeepSpeed ZeRO, updated one mini-batch at a time.

Loss scaling, the part that is easy to get subtly wrong:
- a mini-batch is split into token-budget micro-batches (and, data-parallel, into ranks); each part's loss is
  multiplied by `aggregation_weight(part) / aggregation_weight(whole global mini-batch)` (valid tokens for token-mean
  losses, non-empty sequences otherwise), so the accumulated gradient is exactly the gradient of the loss's own
  aggregation over the global mini-batch, however it was split;
- DeepSpeed averages gradients over the data-parallel ranks, so each rank also multiplies by the world size. The
  global normaliser is an all-reduced count, so ranks holding unequal shares (rows or tokens) are still exact.
- ranks must make the same collective calls in the same order: a rank with fewer micro-batches runs extra
  zero-weight passes; a micro-batch without images runs the vision tower on a blank image (see `_TokenLogprobs`);
  under ZeRO-3 each micro-batch scores its tokens in one lm_head chunk. All ranks must pass the same options
  (loss, rollout_logp or not, old_logp or None, kl_coef) to `update`.

A non-finite loss or gradient norm on any rank makes DeepSpeed's ZeRO optimizer skip the step (gradients zeroed, no
optimizer or scheduler step); the learner reports `skipped=1` and counts consecutive skips in `nonfinite_in_a_row`.

`backend="torch"` replaces DeepSpeed by a plain torch optimizer on one process (`vlm_sapo.learner.torch_engine`: no
ZeRO, same bf16 master-weight and skip rules), for machines without DeepSpeed. `kl_reference=True` keeps the frozen
initial weights for a KL term (`compute_ref_logprobs`; `vlm_sapo.learner.reference` states its memory cost).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlm_sapo.algos import (
    aggregate,
    aggregation_weight,
    get_policy_loss,
    kl_penalty,
    mismatch_metrics,
    policy_loss_aggregation,
    truncated_is_weight,
)
from vlm_sapo.learner import dist_env
from vlm_sapo.learner.ds_config import build_ds_config
from vlm_sapo.learner.lora import apply_lora
from vlm_sapo.learner.micro_batches import BatchLayout, MicroBatch, batch_layout, plan_micro_batches, slice_batch
from vlm_sapo.learner.optim import adamw, lr_multiplier, param_groups
from vlm_sapo.learner.reference import ReferencePolicy
from vlm_sapo.learner.torch_engine import TorchEngine
from vlm_sapo.learner.weights import hf_model, named_full_weights
from vlm_sapo.models.logprobs import token_logprobs
from vlm_sapo.models.routing import FREE, record_routing, replay_routing, routing_shape
from vlm_sapo.models.vision import freeze_vision_params, vision_tower

log = logging.getLogger(__name__)

_DS_TAG = "deepspeed"  # sub-folder of a checkpoint that holds DeepSpeed's model/optimizer/scheduler files


class Learner:
    """A DeepSpeed-wrapped policy with `compute_logprobs` (no grad) and `update` (one optimizer step)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        zero_stage: int = 2,
        deepspeed_config: str | Path | None = None,
        lr: float = 1e-6,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float | None = 1.0,
        micro_batch_tokens: int = 8192,
        bf16: bool | None = None,
        gradient_checkpointing: bool = False,
        freeze_vision: bool = False,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str | None = None,
        temperature: float = 1.0,
        logprob_chunk_size: int = 1024,
        track_entropy: bool = True,
        kl_reference: bool = False,
        backend: str = "deepspeed",
    ) -> None:
        """`bf16=None` picks bf16 where a GPU supports it and fp32 otherwise (CPU). `backend="torch"` ignores
        `zero_stage` and `deepspeed_config`."""
        if backend not in ("deepspeed", "torch"):
            raise ValueError(f"backend must be 'deepspeed' or 'torch', got {backend!r}")
        if backend == "deepspeed" and zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3 (the ZeRO optimizers detect non-finite gradients and "
                             f"skip the step; stage 0 does not), got {zero_stage}")
        if backend == "torch" and max(dist_env.world_size(), int(os.environ.get("WORLD_SIZE", "1"))) > 1:
            raise ValueError("backend='torch' trains on one process (no ZeRO, no data parallel); use DeepSpeed "
                             "for more than one")
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if backend == "deepspeed":
            dist_env.init_distributed()
        if bf16 is None:
            bf16 = dist_env.on_gpu() and torch.cuda.is_bf16_supported()
        self.backend = backend
        self.zero_stage = zero_stage if backend == "deepspeed" else 0
        self.bf16 = bool(bf16)
        self.micro_batch_tokens = micro_batch_tokens
        self.temperature = temperature
        self.logprob_chunk_size = logprob_chunk_size
        self.track_entropy = track_entropy
        self.lora = lora_rank > 0
        self.nonfinite_in_a_row = 0
        self.updates = 0  # optimizer steps applied

        config = hf_model(model).config
        self._image_token_id = getattr(config, "image_token_id", None)
        self._video_token_id = getattr(config, "video_token_id", None)
        vision = getattr(config, "vision_config", None)
        self._merge_size = int(getattr(vision, "spatial_merge_size", 2))

        # the initial weights, before LoRA, freezing or ZeRO touch the model (LoRA: adapters off, no copy)
        self.reference = ReferencePolicy(model) if kl_reference and not self.lora else None
        if freeze_vision:
            freeze_vision_params(model)
        if self.lora:
            model = apply_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                               target_modules=lora_target_modules, exclude_vision=freeze_vision)
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, so it also works with frozen embeddings (LoRA).
            hf_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        optimizer = adamw(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(lr_schedule, warmup_steps, total_steps))
        if backend == "deepspeed":
            ds_config = build_ds_config(zero_stage=zero_stage, bf16=self.bf16, grad_clip=grad_clip,
                                        user_config=deepspeed_config)
            self.bf16 = bool(ds_config["bf16"].get("enabled", False))  # the user's file may switch it
        self.policy = model
        wrapped = _TokenLogprobs(model, vision_dummy=_vision_dummy(config, torch.bfloat16 if self.bf16 else None))
        if backend == "deepspeed":
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
            )
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if dist_env.on_gpu() else torch.device("cpu")
            self.engine = TorchEngine(wrapped, optimizer, scheduler, bf16=self.bf16, grad_clip=grad_clip,
                                      device=device)
            self.optimizer, self.scheduler = optimizer, scheduler
        self.device = self.engine.device
        if self.reference is not None:
            self.reference.to(self.device, torch.bfloat16 if self.bf16 else None)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def hf_model(self) -> torch.nn.Module:
        """The transformers model (base model under LoRA: adapters live in its linear layers)."""
        return hf_model(self.policy)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------------------------------------ forward passes
    def _layout(self, batch: dict) -> BatchLayout:
        return batch_layout(batch, image_token_id=self._image_token_id, video_token_id=self._video_token_id,
                            merge_size=self._merge_size)

    def _plan(self, batch: dict) -> tuple[list[MicroBatch], int]:
        """This rank's micro-batches and the number of passes every rank makes (the largest count)."""
        scored = _completion_mask(batch).bool().any(dim=1)  # rows without a completion token are left out
        if not bool(scored.any()):
            raise ValueError(f"policy batch of {scored.numel()} rows has no completion token; every rank needs at "
                             f"least one row to score")
        plan = plan_micro_batches(batch["attention_mask"], self.micro_batch_tokens, rows=scored)
        return plan, dist_env.all_reduce_max(len(plan), self._comm_device)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist_env.on_gpu() else torch.device("cpu")

    def _to_device(self, part: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in part.items()}

    def _forward(self, inputs: dict, mask: torch.Tensor, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Through the engine's forward: ZeRO counts micro-steps there (without it, ZeRO-3 overwrites the gradient
        of the previous micro-batch instead of accumulating it)."""
        if self.bf16:
            inputs = {k: v.to(torch.bfloat16) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        data_parallel = dist_env.world_size() > 1
        chunk = self.logprob_chunk_size
        if data_parallel and self.zero_stage == 3:
            # ZeRO-3 gathers the lm_head weight at each chunk's call: one chunk per micro-batch keeps the number of
            # gathers equal on all ranks (their token counts differ). Costs [tokens, vocab] logits: lower
            # micro_batch_tokens if that is too much memory.
            chunk = max(1, int(mask.sum()))
        return self.engine(inputs, mask, entropy, self.temperature, chunk, data_parallel)

    @torch.no_grad()
    def compute_logprobs(self, batch: dict, *, adapters: bool = True,
                         return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log p(input_ids[t] | <t) as fp32 `[B, L]` on the batch's device, on completion tokens (0 elsewhere).

        This is old_logp for the first update on a batch. `adapters=False` (LoRA only) gives the base model's
        log-probs: the reference policy for a KL term, at no extra memory. `return_routing` (MoE policies) also
        returns the experts this pass routed every token to, int16 `[B, L, moe_layers, top_k]` (-1 on rows left out),
        for routing replay R2 (`batch["routed_experts"]`, if present, is replayed here too).
        """
        if not adapters and not self.lora:
            raise ValueError("compute_logprobs(adapters=False) needs a LoRA learner; without adapters there is no "
                             "reference policy inside the learner")
        layout, (plan, passes) = self._layout(batch), self._plan(batch)
        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=batch["input_ids"].device)
        routed = None
        if return_routing:
            layers, top_k, _ = routing_shape(self.hf_model)
            routed = torch.full((*batch["input_ids"].shape, layers, top_k), FREE, dtype=torch.int16)
        self.engine.eval()
        ctx = self.policy.disable_adapter() if not adapters else contextlib.nullcontext()
        with ctx:
            for i in range(passes):
                mb = plan[min(i, len(plan) - 1)]
                part = self._to_device(slice_batch(batch, mb, layout))
                mask = part.pop("completion_mask", None)
                with record_routing(self.hf_model) if return_routing else contextlib.nullcontext() as rec:
                    logp, _ = self._forward(part, mask, entropy=False)
                if i < len(plan):
                    out[mb.rows.to(out.device), mb.col_start:mb.col_end] = logp.float().to(out.device)
                    if routed is not None:
                        routed[mb.rows, mb.col_start:mb.col_end] = rec.calls[-1].view(*mask.shape, *routed.shape[2:]
                                                                                       ).to("cpu", torch.int16)
        return out if routed is None else (out, routed)

    @torch.no_grad()
    def compute_ref_logprobs(self, batch: dict) -> torch.Tensor:
        """log p_ref(input_ids[t] | <t) under the initial weights, as `compute_logprobs` (fp32 `[B, L]`, 0 off
        completion tokens): the reference policy of a KL term. LoRA: the policy with adapters disabled; otherwise
        the copy kept by `kl_reference=True`."""
        if self.lora:
            return self.compute_logprobs(batch, adapters=False)
        if self.reference is None:
            raise ValueError("compute_ref_logprobs needs a learner built with kl_reference=True (or with LoRA)")
        layout, (plan, _) = self._layout(batch), self._plan(batch)  # no collectives: the copy is not under ZeRO
        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=batch["input_ids"].device)
        for mb in plan:
            part = self._to_device(slice_batch(batch, mb, layout))
            mask = part.pop("completion_mask")
            logp = self.reference.logprobs(part, mask, temperature=self.temperature, chunk_size=self.logprob_chunk_size)
            out[mb.rows.to(out.device), mb.col_start:mb.col_end] = logp.float().to(out.device)
        return out

    # ------------------------------------------------------------------------------------------------ the update
    def update(
        self,
        batch: dict,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        loss_name: str,
        loss_hparams: dict[str, Any] | None = None,
        *,
        rollout_logp: torch.Tensor | None = None,
        tis_cap: float | None = None,
        kl_coef: float = 0.0,
        ref_logp: torch.Tensor | None = None,
        kl_estimator: str = "k3",
    ) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; returns global (all-rank) metrics.

        `old_logp`, `rollout_logp`, `ref_logp` and per-token `advantages` are `[B, L]`, aligned with
        `batch["input_ids"]`; `advantages` may also be `[B]`. `rollout_logp` adds the train/rollout mismatch metrics
        and, with `tis_cap`, multiplies the advantages by the truncated importance weight min(pi_old/pi_rollout, cap).

        `old_logp=None` is the on-policy case (one update on a batch just sampled by the current weights): pi_old is
        the current policy itself, so each micro-batch uses the detached logprobs of its own forward as old_logp. The
        ratio is then exactly 1 with the gradient of logp, and no separate no-grad pass is spent recomputing them.
        """
        t0 = time.perf_counter()
        hparams = dict(loss_hparams or {})
        loss_fn = get_policy_loss(loss_name)
        mode = policy_loss_aggregation(loss_name)
        max_length = hparams.get("max_length", _default(loss_fn, "max_length"))
        mask_full = _completion_mask(batch)
        shape = tuple(mask_full.shape)
        on_policy = old_logp is None
        if not on_policy:
            _check_shape("old_logp", old_logp, shape)
        if advantages.dim() == 1:
            if advantages.shape[0] != shape[0]:
                raise ValueError(f"advantages has {advantages.shape[0]} rows, the batch {shape[0]}")
            advantages = advantages[:, None].expand(shape)
        _check_shape("advantages", advantages, shape)
        if kl_coef > 0:
            if ref_logp is None:
                raise ValueError("kl_coef > 0 needs ref_logp")
            _check_shape("ref_logp", ref_logp, shape)
        adv = advantages.float()
        sums: dict[str, float] = {}  # weighted sums: by the loss's aggregation weight, or by tokens (per_token)
        maxes: dict[str, float] = {}
        per_token = {"entropy"}
        if rollout_logp is not None:
            _check_shape("rollout_logp", rollout_logp, shape)
            if not on_policy:
                self._add_mismatch(sums, maxes, per_token, old_logp, rollout_logp, mask_full)
            if tis_cap is not None:
                if on_policy:
                    raise ValueError("tis_cap needs old_logp (the weights are taken before the first forward)")
                w = truncated_is_weight(old_logp, rollout_logp, tis_cap)
                adv = adv * w
                valid = mask_full.bool()
                sums["tis_weight_mean"] = float(torch.where(valid, w, 0.0).sum())
                sums["tis_capped_frac"] = float((valid & (w >= tis_cap)).sum())
                per_token |= {"tis_weight_mean", "tis_capped_frac"}
        elif tis_cap is not None:
            raise ValueError("tis_cap needs rollout_logp")

        layout, (plan, passes) = self._layout(batch), self._plan(batch)
        local_weight = aggregation_weight(mode, mask_full)
        local_tokens = float(mask_full.sum())
        local_attended = float(sum(int(batch["attention_mask"][mb.rows].sum()) for mb in plan))
        total_weight, total_tokens, total_attended = dist_env.all_reduce_sum(
            [local_weight, local_tokens, local_attended], self._comm_device)
        if total_weight == 0:
            raise ValueError(f"update batch has no completion token on any rank (loss {loss_name!r}, "
                             f"aggregation {mode!r}); nothing to learn from")
        scale = dist_env.world_size() / total_weight
        lr = self.lr

        self.engine.train()
        logp_full = torch.zeros(shape, dtype=torch.float32)
        replay = contextlib.ExitStack()
        for i in range(passes):
            real = i < len(plan)
            mb = plan[min(i, len(plan) - 1)]
            part = self._to_device(slice_batch(batch, mb, layout))
            mask = part.pop("completion_mask")
            rows, cols = mb.rows, mb.cols
            a = adv[rows][:, cols].to(self.device)
            # Routing replay (R2/R3: the batch's routed_experts) is held through the backward, whose recomputation
            # under gradient checkpointing must route as the forward did.
            replay.enter_context(replay_routing(self.hf_model, part.get("routed_experts")))
            logp, entropy = self._forward(part, mask, entropy=self.track_entropy)
            old = logp.detach().float() if on_policy else old_logp[rows][:, cols].to(self.device).float()
            loss, _ = loss_fn(logp.float(), old, a, mask, **hparams)
            weight = aggregation_weight(mode, mask) if real else 0  # extra passes only keep ranks in step
            total = loss
            if kl_coef > 0:
                ref = ref_logp[rows][:, cols].to(self.device).float()
                kl = aggregate(kl_penalty(logp.float(), ref, mask, kl_estimator), mask, mode, max_length=max_length)
                total = loss + kl_coef * kl
            self.engine.backward(total * (weight * scale), scale_wrt_gas=False)
            replay.close()
            if not real:
                continue
            if kl_coef > 0:
                _add(sums, "kl", float(kl.detach()) * weight)
            logp_full[rows[:, None], torch.arange(mb.col_start, mb.col_end)] = logp.detach().float().cpu()
            _add(sums, "loss", float(total.detach()) * weight)
            _add(sums, "policy_loss", float(loss.detach()) * weight)
            if entropy is not None:
                _add(sums, "entropy", float(torch.where(mask.bool(), entropy.detach().float(), 0.0).sum()))
        # The loss's own metrics over the whole local batch at once: exact whatever their normaliser (tokens or
        # sequences); across ranks they are weighted by tokens.
        if on_policy:
            old_logp = logp_full  # rows left out of the plan have no completion token: 0 in both
            if rollout_logp is not None:
                self._add_mismatch(sums, maxes, per_token, old_logp, rollout_logp, mask_full)
        with torch.no_grad():
            _, metrics = loss_fn(logp_full, old_logp.float().cpu(), adv.cpu(), mask_full.cpu(), **hparams)
        for k, v in metrics.items():
            if k.endswith("_max"):
                maxes[k] = v
            else:
                sums[k] = v * local_tokens
                per_token.add(k)
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        if applied and not math.isfinite(sums.get("loss", 0.0)):
            raise RuntimeError("DeepSpeed applied a step although the loss was not finite; the NaN guard is broken")
        self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
        self.updates += int(applied)
        if not applied:
            log.warning("non-finite loss or gradient: update skipped (%d in a row)", self.nonfinite_in_a_row)

        out = self._reduce(sums, maxes, per_token, total_weight, total_tokens)
        elapsed = time.perf_counter() - t0
        out.update(grad_norm=grad_norm, lr=lr, skipped=float(not applied), nonfinite_in_a_row=self.nonfinite_in_a_row,
                   tokens=total_tokens, micro_batches=float(passes), time_s=elapsed,
                   learner_tokens_per_s=total_attended / elapsed if elapsed > 0 else 0.0)
        return out

    @staticmethod
    def _add_mismatch(sums: dict[str, float], maxes: dict[str, float], per_token: set[str], old_logp: torch.Tensor,
                      rollout_logp: torch.Tensor, mask: torch.Tensor) -> None:
        """Train/rollout mismatch metrics (pi_old against the engine's logprobs), as token-weighted sums."""
        n_tok = float(mask.sum())
        for k, v in mismatch_metrics(old_logp.cpu(), rollout_logp.cpu(), mask.cpu()).items():
            if k.endswith("_max"):
                maxes[k] = v
            else:
                sums[k] = v * n_tok
                per_token.add(k)

    def _reduce(self, sums: dict[str, float], maxes: dict[str, float], per_token: set[str], total_weight: float,
                total_tokens: float) -> dict[str, float]:
        """Weighted sums and maxima over ranks -> means (per_token keys over tokens, the rest over loss weight)."""
        keys = sorted(sums)
        summed = dist_env.all_reduce_sum([sums[k] for k in keys], self._comm_device)
        mkeys = sorted(maxes)
        if mkeys and dist_env.world_size() > 1:
            t = torch.tensor([maxes[k] for k in mkeys], dtype=torch.float64, device=self._comm_device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            maxes = dict(zip(mkeys, t.tolist()))
        out = {k: v / (total_tokens if k in per_token else total_weight) for k, v in zip(keys, summed)}
        out.update(maxes)
        return out

    # ------------------------------------------------------------------------------------------------ weights & state
    def named_weights_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every policy weight, LoRA merged; under ZeRO-3 all ranks must drain it."""
        return named_full_weights(self.policy, zero3=self.zero_stage == 3)

    def save_state(self, folder: str | Path) -> None:
        """Model, optimizer and scheduler (DeepSpeed's files) plus the learner's counters; all ranks must call."""
        self.engine.save_checkpoint(str(folder), tag=_DS_TAG, save_latest=False,
                                    client_state={"learner": {"nonfinite_in_a_row": self.nonfinite_in_a_row,
                                                              "updates": self.updates}})

    def load_state(self, folder: str | Path) -> None:
        path, client = self.engine.load_checkpoint(str(folder), tag=_DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {Path(folder) / _DS_TAG}")
        state = (client or {}).get("learner", {})
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.updates = int(state.get("updates", 0))


# ---------------------------------------------------------------------------------------------------------- helpers
class _TokenLogprobs(torch.nn.Module):
    """The module DeepSpeed wraps: its forward is `token_logprobs` of the policy, so every pass runs through
    `engine.forward` (ZeRO's per-forward bookkeeping) while the logits stay chunked.

    With `touch_vision` (data-parallel), a micro-batch without images still runs the vision tower, on a blank
    2x2-patch image, and adds 0 x its output to the result (an exact no-op), so that every rank makes the same
    collective calls whether or not its micro-batch holds images: ZeRO-2 reduces the gradients of the parameters that
    got one, ZeRO-3 gathers the parameters of each module that runs. The blank image runs where real images do,
    right after the token-embedding lookup: ZeRO-2 packs gradients into its reduce buckets in the order autograd
    finishes them, and a different order on two ranks would add up different parameters' gradients.
    """

    def __init__(self, policy: torch.nn.Module, vision_dummy: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.policy = policy
        self.vision_dummy = vision_dummy

    def forward(self, inputs: dict, mask: torch.Tensor, entropy: bool, temperature: float, chunk_size: int,
                touch_vision: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        blank: list[torch.Tensor] = []
        no_images = inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None
        handle = None
        if touch_vision and no_images and self.vision_dummy is not None:
            model = hf_model(self.policy)

            def after_embedding(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
                if not blank:
                    pixels, grid = (t.to(output.device) for t in self.vision_dummy)
                    out = vision_tower(model)(pixels, grid_thw=grid)
                    blank.append(0.0 * sum(t.float().sum() for t in _tensors(out)))

            handle = model.get_input_embeddings().register_forward_hook(after_embedding)
        try:
            logp, ent = token_logprobs(self.policy, inputs, temperature=temperature, chunk_size=chunk_size,
                                       return_entropy=entropy, completion_mask=mask)
        finally:
            if handle is not None:
                handle.remove()
        return (logp + blank[0] if blank else logp), ent


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, or a dict-like ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _vision_dummy(config: Any, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A blank image of merge x merge patches in the vision tower's input layout (None for a text-only model)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    merge = int(getattr(vision, "spatial_merge_size", 2))
    dim = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    return torch.zeros(merge * merge, dim, dtype=dtype or torch.float32), torch.tensor([[1, merge, merge]])


def _add(d: dict[str, float], key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


def _default(fn: Any, name: str) -> Any:
    p = inspect.signature(fn).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _completion_mask(batch: dict) -> torch.Tensor:
    mask = batch.get("completion_mask")
    if mask is None:
        raise KeyError(f"policy batch has no 'completion_mask' (keys: {sorted(batch)}); build it with "
                       f"build_policy_inputs")
    return mask


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} (aligned with batch['input_ids'])")
