"""Per-token log-probabilities of prompt + completion batches, without the [batch, tokens, vocab] logits.

At Qwen's 151,936-token vocabulary the fp32 logits of 8 x 1024 tokens are 5 GB, and a naive log_softmax + backward
holds three or four such tensors. Here the backbone returns final hidden states; the lm_head, the fp32 log-softmax
and its gradient run chunk by chunk over only the tokens that are scored (usually the completion), and the backward
recomputes each chunk's logits instead of keeping them, unless all of them fit a small budget (`KEEP_PROBS_BYTES`),
where keeping them saves a matmul. Values and gradients equal the naive computation.

Positions: Qwen-VL uses 3-D mRoPE ids that depend on every image's grid. They are rebuilt here for the whole
prompt + completion with the model's own `get_rope_index`, from `mm_token_type_ids` and the attention mask, so the
learner scores exactly what the rollout engine sampled (left- or right-padded batches alike); after a video the
text positions follow the released models and vLLM, not transformers 5.3+ (`vlm_sapo.models.rope`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm_sapo.models.rope import FAMILIES as ROPE_FIXED_FAMILIES
from vlm_sapo.models.rope import continue_after_video
from vlm_sapo.models.routing import replay_routing

# Inputs that belong to the vision side and are concatenated over prompts (not padded per row).
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def unwrap_causal_lm(model: Any) -> Any:
    """The transformers `...ForConditionalGeneration` inside a DeepSpeed engine or PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while not hasattr(model, "lm_head") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise TypeError(f"{type(model).__name__} is not a Qwen-VL ForConditionalGeneration (needs .model and .lm_head)")
    return model


def mm_token_type_ids_for(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Text 0, image 1, video 2: what the Qwen-VL processors return, derived from the config's token ids."""
    config = unwrap_causal_lm(model).config
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


@torch.no_grad()
def rope_position_ids(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """mRoPE position ids [3, B, T] for the full sequences, as generate() builds them for the prompt and continues."""
    backbone = unwrap_causal_lm(model).model
    input_ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = mm_token_type_ids_for(model, input_ids)
    kwargs = {
        k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if inputs.get(k) is not None
    }
    position_ids, _ = backbone.get_rope_index(
        input_ids, mm_token_type_ids=types, attention_mask=inputs.get("attention_mask"), **kwargs
    )
    if backbone.config.model_type in ROPE_FIXED_FAMILIES and bool((types == 2).any()):
        # text after a video continues where vLLM and the released models put it (see vlm_sapo.models.rope)
        position_ids, _ = continue_after_video(position_ids, types, inputs.get("attention_mask"))
    return position_ids


def scored_positions(attention_mask: torch.Tensor, completion_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, T]: tokens that get a logprob (in the mask, t >= 1, and the previous token is not padding)."""
    mask = (attention_mask if completion_mask is None else completion_mask).bool()
    if mask.shape != attention_mask.shape:
        raise ValueError(f"completion_mask has shape {tuple(mask.shape)}, input_ids {tuple(attention_mask.shape)}")
    valid = torch.zeros_like(mask)
    valid[:, 1:] = mask[:, 1:] & attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return valid


# The forward keeps exp(logits - max) for the backward while it fits in this many bytes: the backward then needs two
# matmuls with the lm_head instead of three (one recomputes the logits). Past it, the logits are recomputed.
KEEP_PROBS_BYTES = 256 * 2**20


class _ChunkedLogprob(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] @ W.T / temperature)[target[n]], chunk by chunk, in fp32.

    The forward keeps the per-row log-sum-exp, and, when `keep_bytes` allows and a gradient is needed, the
    unnormalised probabilities exp(z - max) of every row ([N, vocab] fp32). The backward uses those, or recomputes
    one chunk of logits at a time, so the recomputing path never holds more than one [chunk, vocab] fp32 buffer,
    reused across chunks (fresh multi-GB allocations cost as much as the arithmetic on CPU). Entropy (optional) is
    computed without gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, want_entropy, keep_bytes=0):
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if want_entropy else torch.zeros(0, **f32)
        keep = n > 0 and any(ctx.needs_input_grad[:2]) and n * vocab * 4 <= keep_bytes
        kept = torch.empty(n, vocab, **f32) if keep else None
        inv_sum = torch.empty(n, **f32) if keep else None
        step = min(chunk_size, 128) if keep else chunk_size  # kept rows need no big scratch buffer
        rows_max = max(1, min(step, n))
        buf = torch.empty(rows_max, vocab, **f32)
        ebuf = torch.empty(rows_max, vocab, **f32) if want_entropy and not keep else None
        for s in range(0, n, step):
            z = _logits_into(buf, hidden[s : s + step], weight, temperature)
            m = z.shape[0]
            rows = slice(s, s + m)
            target_z = z.gather(-1, targets[rows, None]).squeeze(-1)
            z_max = z.amax(-1, keepdim=True)
            z.sub_(z_max)  # y = z - max, in place
            if kept is not None or ebuf is not None:  # e = exp(y) beside y
                e = torch.exp(z, out=kept[rows] if kept is not None else ebuf[:m])
                sum_exp = e.sum(-1)
                if want_entropy:  # H = log(sum e^y) - sum(e^y * y) / sum(e^y)
                    entropy[rows] = sum_exp.log() - z.mul_(e).sum(-1) / sum_exp
                if inv_sum is not None:
                    inv_sum[rows] = sum_exp.reciprocal()
            else:
                sum_exp = z.exp_().sum(-1)
            lse[rows] = z_max.squeeze(-1) + sum_exp.log()
            logp[rows] = target_z - lse[rows]
        del buf, ebuf
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.kept, ctx.inv_sum = kept, inv_sum
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        kept, inv_sum = ctx.kept, ctx.inv_sum
        ctx.kept = ctx.inv_sum = None  # consumed in place below: a second backward (retain_graph) recomputes
        temperature, chunk = ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = None if kept is not None else torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32,
                                                        device=hidden.device)
        # d logp / d z = onehot - softmax(z) with z = logits / T: the chain rule to h and W carries 1 / T.
        g_all = grad_logp.float() / temperature
        fp32 = weight.dtype == torch.float32 and hidden.dtype == torch.float32
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            rows = slice(s, s + h.shape[0])
            g = g_all[rows]
            if kept is not None:  # softmax = e * (1 / sum e)
                z = kept[rows].mul_((-g * inv_sum[rows])[:, None])  # -g * softmax
            else:
                z = _logits_into(buf, h, weight, temperature)
                z.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -g * softmax
            z[torch.arange(h.shape[0], device=h.device), targets[rows]] += g
            if need_h:
                if fp32:
                    torch.mm(z, weight, out=grad_h[rows])
                else:  # the same low-precision matmul autograd runs through `linear(h, W).float()`
                    grad_h[rows] = z.to(weight.dtype) @ weight
            if need_w:
                if fp32:
                    grad_w.addmm_(z.t(), h)
                else:
                    grad_w.add_((z.t().to(hidden.dtype) @ h).float())
        del buf, kept
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def _logits_into(buf: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 (hidden @ weight.T) / temperature written into the first rows of `buf`."""
    out = buf[: hidden.shape[0]]
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        # Scaling the [rows, H] input instead of the [rows, vocab] output saves a pass over the logits.
        torch.mm(hidden if temperature == 1.0 else hidden / temperature, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.t())
        if temperature != 1.0:
            out.div_(temperature)
    return out


def _checkpointed_logprob(lm_head, hidden, targets, temperature, chunk_size, want_entropy):
    """Same values through the lm_head module itself, one torch.utils.checkpoint per chunk.

    Used when the lm_head weight is partitioned (DeepSpeed ZeRO-3): calling the module lets ZeRO gather it in the
    forward and again in the recomputing backward, which the fused path's direct weight access cannot do.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_fn(h, t):
        logits = lm_head(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        return logits.gather(-1, t[:, None]).squeeze(-1) - lse

    out, ent = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        out.append(checkpoint(chunk_fn, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_fn(h, t))
        if want_entropy:
            with torch.no_grad():  # through the module, so a partitioned weight is gathered here too
                logits = lm_head(h.detach()).float() / temperature
                ent.append(torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return (torch.cat(out) if out else empty), (torch.cat(ent) if ent else empty)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp[n] = log_softmax(hidden[n] @ weight.T / temperature)[targets[n]] in fp32, for [N, H] hidden rows.

    Holds [N, vocab] probabilities from forward to backward when that is at most `keep_probs_bytes` (saving the
    backward one matmul with the lm_head), else never more than [chunk_size, vocab] logits (the backward recomputes
    them). Both give the same values and gradients.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"need hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    keep = keep_probs_bytes if torch.is_grad_enabled() else 0  # ctx.needs_input_grad ignores no_grad
    logp, entropy = _ChunkedLogprob.apply(hidden, weight, targets, temperature, chunk_size, return_entropy, keep)
    return logp, (entropy if return_entropy else None)


def _weight_is_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id") or weight.numel() == 0


def token_logprobs(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    completion_mask: torch.Tensor | None = None,
    impl: str = "auto",
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp[b, t] = log_softmax(logits[b, t-1] / temperature)[input_ids[b, t]] in fp32, aligned to input_ids.

    `inputs`: input_ids and attention_mask [B, T] (right padding from `build_policy_inputs`, or left padding),
    pixel_values / image_grid_thw (and video keys) for all images in row order, and mm_token_type_ids (derived from
    the image/video token ids when absent). `completion_mask` (default: `inputs["completion_mask"]` when present)
    restricts the work to those tokens; the logprob and entropy of every other position are 0. `routed_experts`
    ([B, T, moe_layers, top_k], MoE policies) replays those experts (`vlm_sapo.models.routing`). Gradients flow to the
    model unless called under `torch.no_grad()`; entropy never has a gradient.
    `impl`: "fused" (a custom autograd function, fastest), "checkpoint" (per-chunk checkpoint through the lm_head
    module, works with ZeRO-3 partitioned weights) or "auto" (fused unless the weight is partitioned).
    `keep_probs_bytes`: see `chunked_logprobs` (fused path only).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if impl not in ("auto", "fused", "checkpoint"):
        raise ValueError(f"impl must be auto, fused or checkpoint; got {impl!r}")
    missing = [k for k in ("input_ids", "attention_mask") if k not in inputs]
    if missing:
        raise KeyError(f"token_logprobs inputs lack {missing}; build them with build_policy_inputs()")
    lm = unwrap_causal_lm(model)
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    if completion_mask is None:
        completion_mask = inputs.get("completion_mask")
    positions = scored_positions(attention_mask, completion_mask)

    model_inputs = {k: inputs[k] for k in _VISION_KEYS if inputs.get(k) is not None}
    mm_types = inputs.get("mm_token_type_ids")
    if mm_types is None:
        mm_types = mm_token_type_ids_for(lm, input_ids)
    position_ids = rope_position_ids(lm, {**inputs, "mm_token_type_ids": mm_types})
    with replay_routing(lm, inputs.get("routed_experts")):
        hidden = lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=mm_types,
            use_cache=False,
            **model_inputs,
        ).last_hidden_state

    # Hidden state at t-1 predicts token t: select only the scored targets before touching the vocabulary.
    sel = positions[:, 1:]
    h = hidden[:, :-1][sel]
    targets = input_ids[:, 1:][sel]
    weight, bias = lm.lm_head.weight, lm.lm_head.bias
    # The fused path has no bias term (no Qwen-VL lm_head has one); the checkpointed module call handles any head.
    use_checkpoint = impl == "checkpoint" or (impl == "auto" and (_weight_is_partitioned(weight) or bias is not None))
    if use_checkpoint:
        logp_sel, ent_sel = _checkpointed_logprob(lm.lm_head, h, targets, temperature, chunk_size, return_entropy)
    else:
        logp_sel, ent_sel = chunked_logprobs(
            h, weight, targets, temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
            keep_probs_bytes=keep_probs_bytes,
        )

    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    logp = logp.masked_scatter(positions, logp_sel) if logp_sel.numel() else logp
    entropy = None
    if return_entropy:
        entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
        if ent_sel is not None and ent_sel.numel():
            entropy[positions] = ent_sel.detach()
    return logp, entropy


def _rows(prompt_inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split prompt model-inputs into one dict per prompt, padding removed, vision tensors kept in order."""
    if isinstance(prompt_inputs, Mapping):
        ids = prompt_inputs["input_ids"]
        mask = prompt_inputs.get("attention_mask")
        types = prompt_inputs.get("mm_token_type_ids")
        rows = []
        for b in range(ids.shape[0]):
            keep = mask[b].bool() if mask is not None else torch.ones_like(ids[b], dtype=torch.bool)
            rows.append({"input_ids": ids[b][keep], "mm_token_type_ids": None if types is None else types[b][keep]})
        vision = {k: prompt_inputs[k] for k in _VISION_KEYS if prompt_inputs.get(k) is not None}
        if rows:
            rows[0]["_vision"] = vision  # already concatenated over prompts in row order
        return rows
    rows = []
    for i, p in enumerate(prompt_inputs):
        if "input_ids" not in p:
            raise KeyError(f"prompt_inputs[{i}] has no input_ids (keys: {sorted(p)})")
        ids = torch.as_tensor(p["input_ids"])
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"prompt_inputs[{i}] holds {ids.shape[0]} prompts; pass one prompt per entry")
            ids = ids[0]
        mask = p.get("attention_mask")
        keep = torch.as_tensor(mask).reshape(-1).bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        types = p.get("mm_token_type_ids")
        types = None if types is None else torch.as_tensor(types).reshape(-1)[keep]
        vision = {k: p[k] for k in _VISION_KEYS if p.get(k) is not None}
        rows.append({"input_ids": ids[keep], "mm_token_type_ids": types, "_vision": vision})
    return rows


def build_policy_inputs(
    prompt_inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + completion rows, right-padded, for `token_logprobs` and the learner.

    `prompt_inputs`: one processor output per completion (repeat a prompt's dict for its n samples), or one batched
    processor output with a row per completion (left or right padded). Returns input_ids, attention_mask,
    mm_token_type_ids (zeros over the completion), completion_mask (1 on completion tokens), prompt_lengths, and the
    vision tensors concatenated in row order.
    """
    rows = _rows(prompt_inputs)
    if len(rows) != len(completion_ids):
        raise ValueError(f"{len(rows)} prompts but {len(completion_ids)} completions; repeat each prompt per sample")
    seqs, types, comp = [], [], []
    for i, (row, completion) in enumerate(zip(rows, completion_ids)):
        prompt = row["input_ids"].long()
        c = torch.as_tensor(list(completion), dtype=torch.long)
        if c.dim() != 1:
            raise ValueError(f"completion_ids[{i}] must be a flat list of token ids")
        t = row["mm_token_type_ids"]
        if t is None:
            raise KeyError(f"prompt {i} has no mm_token_type_ids; use the Qwen-VL processor's output")
        seqs.append(torch.cat([prompt, c]))
        types.append(torch.cat([t.long(), torch.zeros_like(c)]))
        comp.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(c)]))
    width = max((len(s) for s in seqs), default=0)
    batch = len(seqs)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((batch, width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((batch, width), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((batch, width), dtype=torch.long),
        "completion_mask": torch.zeros((batch, width), dtype=torch.long),
        "prompt_lengths": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long),
    }
    for b, (s, t, c) in enumerate(zip(seqs, types, comp)):
        out["input_ids"][b, : len(s)] = s
        out["attention_mask"][b, : len(s)] = 1
        out["mm_token_type_ids"][b, : len(s)] = t
        out["completion_mask"][b, : len(s)] = c
    for key in _VISION_KEYS:
        parts = [r["_vision"][key] for r in rows if key in r.get("_vision", {})]
        if parts:
            out[key] = torch.cat([torch.as_tensor(p) for p in parts], dim=0)
    return out
