"""The policy learner: a Qwen-VL model under DeepSpeed ZeRO, updated one mini-batch at a time.

Built from the recipe's sections: `Learner(model, recipe.learner, recipe.model, total_steps=..., temperature=...)`;
`update(UpdateBatch(...), Objective(...))` makes one optimizer step (`vlm_sapo.learner.update_batch`).

Loss scaling, the part that is easy to get subtly wrong:
- a mini-batch is split into token-budget micro-batches (and, data-parallel, into ranks); each part's loss is
  multiplied by `aggregation_weight(part) / aggregation_weight(whole global mini-batch)` (valid tokens for token-mean
  losses, non-empty sequences otherwise), so the accumulated gradient is exactly the gradient of the loss's own
  aggregation over the global mini-batch, however it was split;
- DeepSpeed averages gradients over the data-parallel ranks, so each rank also multiplies by the world size. The
  global normaliser is an all-reduced count, so ranks holding unequal shares (rows or tokens) are still exact.
- ranks must make the same collective calls in the same order: a rank with fewer micro-batches runs extra
  zero-weight passes; a micro-batch without images runs the vision tower on a blank image (see
  `forward.TokenLogprobs`); under ZeRO-3 each micro-batch scores its tokens in one lm_head chunk. All ranks must pass
  the same `Objective` and the same None-ness of `UpdateBatch`'s logprobs (rollout_logp, old_logp) to `update`.

A non-finite loss or gradient norm on any rank makes DeepSpeed's ZeRO optimizer skip the step (gradients zeroed, no
optimizer or scheduler step); the learner reports `skipped=1` and counts consecutive skips in `nonfinite_in_a_row`.

`backend="torch"` replaces DeepSpeed by a plain torch optimizer on one process (`vlm_sapo.learner.torch_engine`: no
ZeRO, same bf16 master-weight and skip rules), for machines without DeepSpeed. `kl_reference=True` keeps the frozen
initial weights for a KL term (`compute_ref_logprobs`; `vlm_sapo.learner.reference` states its memory cost).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm_sapo.algos import aggregate, aggregation_weight, kl_penalty
from vlm_sapo.learner import dist_env
from vlm_sapo.learner.ds_config import build_ds_config
from vlm_sapo.learner.forward import TokenLogprobs, vision_dummy
from vlm_sapo.learner.lora import apply_lora
from vlm_sapo.learner.micro_batches import BatchLayout, MicroBatch, batch_layout, plan_micro_batches, slice_batch
from vlm_sapo.learner.optim import adamw, lr_multiplier, param_groups
from vlm_sapo.learner.reference import ReferencePolicy
from vlm_sapo.learner.torch_engine import TorchEngine
from vlm_sapo.learner.update_batch import (
    CheckedUpdate,
    MetricSums,
    Objective,
    UpdateBatch,
    check_update,
    completion_mask,
)
from vlm_sapo.learner.weights import hf_model, named_full_weights
from vlm_sapo.models.routing import FREE, record_routing, replay_routing, routing_shape
from vlm_sapo.models.vision import freeze_vision_params

if TYPE_CHECKING:  # pydantic stays unimported: scripts/gpu_check.py runs where it is absent
    from vlm_sapo.recipe import LearnerCfg, ModelCfg

log = logging.getLogger(__name__)

_DS_TAG = "deepspeed"  # sub-folder of a checkpoint that holds DeepSpeed's model/optimizer/scheduler files


@dataclass
class _Totals:
    """An update's all-rank normalisers: the loss's aggregation weight, completion tokens, attended tokens."""

    weight: float
    tokens: float
    attended: float


class Learner:
    """A DeepSpeed-wrapped policy with `compute_logprobs` (no grad) and `update` (one optimizer step)."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerCfg, model_cfg: ModelCfg, *, total_steps: int | None = None,
                 temperature: float = 1.0, kl_reference: bool = False, backend: str = "deepspeed",
                 bf16: bool | None = None, eps: float = 1e-8, track_entropy: bool = True) -> None:
        """`cfg` is the recipe's `learner` section (optimizer, schedule, ZeRO, micro-batch and logprob chunk sizes),
        `model_cfg` its `model` section (gradient checkpointing, the vision-tower freeze, LoRA). They are read field
        by field, so any object with those fields does (scripts/gpu_check.py passes namespaces: pydantic is absent
        on its machine). The keywords are what those sections do not hold:
        - `total_steps`: optimizer steps the lr schedule spans (default `cfg.steps`; the trainer makes
          `algorithm.mini_batches` updates per step);
        - `temperature`: the rollout's sampling temperature, which the learner's logprobs must use too;
        - `kl_reference`: keep the initial weights for a KL term (the trainer: `algorithm.kl_coef > 0`);
        - `backend`: "deepspeed", or "torch" (one process, no ZeRO; ignores `zero_stage` and `deepspeed_config`);
        - `bf16`: None picks bf16 where a GPU supports it and fp32 otherwise (CPU); `eps`: AdamW's epsilon;
          `track_entropy`: report the policy's token entropy.
        """
        _check_options(cfg, backend, temperature)
        if backend == "deepspeed":
            dist_env.init_distributed()
        if bf16 is None:
            bf16 = dist_env.on_gpu() and torch.cuda.is_bf16_supported()
        self.backend = backend
        self.zero_stage = cfg.zero_stage if backend == "deepspeed" else 0
        self.bf16 = bool(bf16)
        self.micro_batch_tokens = cfg.micro_batch_tokens
        self.temperature = temperature
        self.logprob_chunk_size = cfg.logprob_chunk_size
        self.track_entropy = track_entropy
        self.lora = model_cfg.lora is not None
        self.nonfinite_in_a_row = 0
        self.updates = 0  # optimizer steps applied

        config = hf_model(model).config
        self._image_token_id = getattr(config, "image_token_id", None)
        self._video_token_id = getattr(config, "video_token_id", None)
        vision = getattr(config, "vision_config", None)
        self._merge_size = int(getattr(vision, "spatial_merge_size", 2))

        # the initial weights, before LoRA, freezing or ZeRO touch the model (LoRA: adapters off, no copy)
        self.reference = ReferencePolicy(model) if kl_reference and not self.lora else None
        self.policy = model = _prepare_model(model, model_cfg)
        optimizer = adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=eps)
        schedule = lr_multiplier(cfg.lr_schedule, cfg.warmup_steps, cfg.steps if total_steps is None else total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if backend == "deepspeed":
            self._init_deepspeed(model, config, optimizer, scheduler, cfg)
        else:
            wrapped = TokenLogprobs(model, vision_dummy=vision_dummy(config, torch.bfloat16 if self.bf16 else None))
            device = torch.device("cuda", torch.cuda.current_device()) if dist_env.on_gpu() else torch.device("cpu")
            self.engine = TorchEngine(wrapped, optimizer, scheduler, bf16=self.bf16, grad_clip=cfg.grad_clip,
                                      device=device)
            self.optimizer, self.scheduler = optimizer, scheduler
        self.device = self.engine.device
        if self.reference is not None:
            self.reference.to(self.device, torch.bfloat16 if self.bf16 else None)

    def _init_deepspeed(self, model: torch.nn.Module, config: Any, optimizer: torch.optim.Optimizer,
                        scheduler: Any, cfg: LearnerCfg) -> None:
        import deepspeed

        ds_config = build_ds_config(zero_stage=cfg.zero_stage, bf16=self.bf16, grad_clip=cfg.grad_clip,
                                    user_config=cfg.deepspeed_config)
        self.bf16 = bool(ds_config["bf16"].get("enabled", False))  # the user's file may switch it
        wrapped = TokenLogprobs(model, vision_dummy=vision_dummy(config, torch.bfloat16 if self.bf16 else None))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )

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
        scored = completion_mask(batch).bool().any(dim=1)  # rows without a completion token are left out
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
    def update(self, batch: UpdateBatch, objective: Objective) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; returns global (all-rank) metrics.

        `batch.rollout_logp` adds the train/rollout mismatch metrics and, with `objective.tis_cap`, multiplies the
        advantages by the truncated importance weight min(pi_old/pi_rollout, cap).

        `batch.old_logp=None` is the on-policy case (one update on a batch just sampled by the current weights): pi_old
        is the current policy itself, so each micro-batch uses the detached logprobs of its own forward as old_logp.
        The ratio is then exactly 1 with the gradient of logp, and no separate no-grad pass is spent recomputing them.

        Three parts: `check_update` (shapes, options, the off-policy mismatch and IS weights), `_accumulate` (the
        micro-batch forwards and backwards), `_step` (the optimizer step, the non-finite guard, the metrics).
        """
        t0 = time.perf_counter()
        checked = check_update(batch, objective)
        plan, passes = self._plan(batch.inputs)
        totals = self._totals(batch.inputs, checked, plan, objective.loss)
        lr = self.lr
        logp_full = self._accumulate(batch, objective, checked, plan, passes, dist_env.world_size() / totals.weight)
        # The loss's own metrics over the whole local batch at once: exact whatever their normaliser (tokens or
        # sequences); across ranks they are weighted by tokens.
        old_logp = batch.old_logp
        if batch.on_policy:
            old_logp = logp_full  # rows left out of the plan have no completion token: 0 in both
            if batch.rollout_logp is not None:
                checked.metrics.add_mismatch(old_logp, batch.rollout_logp, checked.mask)
        with torch.no_grad():
            _, metrics = checked.loss_fn(logp_full, old_logp.float().cpu(), checked.adv.cpu(), checked.mask.cpu(),
                                         **objective.hparams)
        checked.metrics.put_means(metrics, float(checked.mask.sum()))
        return self._step(checked.metrics, totals, passes, lr, t0)

    def _totals(self, inputs: dict, checked: CheckedUpdate, plan: list[MicroBatch], loss: str) -> _Totals:
        local = [aggregation_weight(checked.mode, checked.mask), float(checked.mask.sum()),
                 float(sum(int(inputs["attention_mask"][mb.rows].sum()) for mb in plan))]
        totals = _Totals(*dist_env.all_reduce_sum(local, self._comm_device))
        if totals.weight == 0:
            raise ValueError(f"update batch has no completion token on any rank (loss {loss!r}, aggregation "
                             f"{checked.mode!r}); nothing to learn from")
        return totals

    def _accumulate(self, batch: UpdateBatch, objective: Objective, checked: CheckedUpdate, plan: list[MicroBatch],
                    passes: int, scale: float) -> torch.Tensor:
        """Forward and backward of every micro-batch, each loss times its share of the global aggregation weight
        (`scale` = world size / global weight); returns this rank's logprobs `[B, L]` (fp32, CPU)."""
        layout, mode, sums, kl_coef = self._layout(batch.inputs), checked.mode, checked.metrics, objective.kl_coef
        self.engine.train()
        logp_full = torch.zeros(tuple(checked.mask.shape), dtype=torch.float32)
        replay = contextlib.ExitStack()
        for i in range(passes):
            real = i < len(plan)
            mb = plan[min(i, len(plan) - 1)]
            part = self._to_device(slice_batch(batch.inputs, mb, layout))
            mask = part.pop("completion_mask")
            rows, cols = mb.rows, mb.cols
            a = checked.adv[rows][:, cols].to(self.device)
            # Routing replay (R2/R3: the batch's routed_experts) is held through the backward, whose recomputation
            # under gradient checkpointing must route as the forward did.
            replay.enter_context(replay_routing(self.hf_model, part.get("routed_experts")))
            logp, entropy = self._forward(part, mask, entropy=self.track_entropy)
            old = logp.detach().float() if batch.on_policy else batch.old_logp[rows][:, cols].to(self.device).float()
            loss, _ = checked.loss_fn(logp.float(), old, a, mask, **objective.hparams)
            weight = aggregation_weight(mode, mask) if real else 0  # extra passes only keep ranks in step
            total = loss
            if kl_coef > 0:
                ref = batch.ref_logp[rows][:, cols].to(self.device).float()
                kl = aggregate(kl_penalty(logp.float(), ref, mask, objective.kl_estimator), mask, mode,
                               max_length=checked.max_length)
                total = loss + kl_coef * kl
            self.engine.backward(total * (weight * scale), scale_wrt_gas=False)
            replay.close()
            if not real:
                continue
            if kl_coef > 0:
                sums.add("kl", float(kl.detach()) * weight)
            logp_full[rows[:, None], torch.arange(mb.col_start, mb.col_end)] = logp.detach().float().cpu()
            sums.add("loss", float(total.detach()) * weight)
            sums.add("policy_loss", float(loss.detach()) * weight)
            if entropy is not None:
                sums.add("entropy", float(torch.where(mask.bool(), entropy.detach().float(), 0.0).sum()))
        return logp_full

    def _step(self, sums: MetricSums, totals: _Totals, passes: int, lr: float, t0: float) -> dict[str, float]:
        """The optimizer step (skipped by the engine on a non-finite loss or gradient) and the update's metrics."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        if applied and not math.isfinite(sums.sums.get("loss", 0.0)):
            raise RuntimeError("DeepSpeed applied a step although the loss was not finite; the NaN guard is broken")
        self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
        self.updates += int(applied)
        if not applied:
            log.warning("non-finite loss or gradient: update skipped (%d in a row)", self.nonfinite_in_a_row)

        out = sums.reduce(totals.weight, totals.tokens, self._comm_device)
        elapsed = time.perf_counter() - t0
        out.update(grad_norm=grad_norm, lr=lr, skipped=float(not applied), nonfinite_in_a_row=self.nonfinite_in_a_row,
                   tokens=totals.tokens, micro_batches=float(passes), time_s=elapsed,
                   learner_tokens_per_s=totals.attended / elapsed if elapsed > 0 else 0.0)
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
def _check_options(cfg: LearnerCfg, backend: str, temperature: float) -> None:
    """What the recipe's schema checks too, for callers that pass plain objects."""
    if backend not in ("deepspeed", "torch"):
        raise ValueError(f"backend must be 'deepspeed' or 'torch', got {backend!r}")
    if backend == "deepspeed" and cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3 (the ZeRO optimizers detect non-finite gradients and "
                         f"skip the step; stage 0 does not), got {cfg.zero_stage}")
    if backend == "torch" and max(dist_env.world_size(), int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        raise ValueError("backend='torch' trains on one process (no ZeRO, no data parallel); use DeepSpeed "
                         "for more than one")
    if cfg.micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {cfg.micro_batch_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _prepare_model(model: torch.nn.Module, model_cfg: ModelCfg) -> torch.nn.Module:
    """The vision-tower freeze, LoRA adapters and gradient checkpointing of the `model` section."""
    freeze = model_cfg.freeze_vision_tower
    if freeze:
        freeze_vision_params(model)
    lora = model_cfg.lora
    if lora is not None:
        model = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules, exclude_vision=freeze)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it also works with frozen embeddings (LoRA).
        hf_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
