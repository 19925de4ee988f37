"""Routing replay for MoE policies: record the experts every token was routed to, and force them in later passes.

Why: in an MoE policy a small weight change can flip which experts a token goes to, and a flipped expert changes that
token's logprob by far more than the weight change would otherwise; the importance ratios of otherwise on-policy
tokens become noisy (the SAPO paper's motivation for its MoE experiments). Replay holds the routing fixed:
- `r2`: every update replays the experts the learner's own old-policy pass chose (the ratio then compares two
  policies that route alike);
- `r3`: the old-policy pass and every update replay the experts the rollout engine chose, so that the learner
  scores with the rollout's routing (and train/rollout mismatch from routing disappears).

How: a forward hook on every transformers `Qwen3VLMoeTextTopKRouter`. The router returns (logits z, top-k weights,
top-k indices); under a replay the hook swaps in the replayed indices S and recomputes their weights from the current
logits as w_e = softmax(z_S)_e = exp(z_e) / sum_{j in S} exp(z_j), which is exactly the router's own formula (softmax
over all experts, top-k, renormalised over the k; the full softmax's denominator cancels). Hence, what gets a gradient
(tests/learner/test_routing_replay.py checks it): per token and layer, the router weight rows W[e] of the replayed
experts e in S (through z_e = W[e] . h), the hidden state h, and the replayed experts' own weights; the rows of the
experts outside S get exactly zero from that token, as without replay (top-k selection is not differentiable either
way). With top_k = 1 the single weight is 1 and the router gets no gradient at all. Replay changes which experts
count as chosen, never how their weights are computed.

Layout: `routed_experts` tensors are [batch, tokens, moe_layers, top_k] (int16, aligned with `input_ids`); a position
holding -1 routes freely (the router's own choice), e.g. the last completion token, which the rollout engine never fed
to the model, and padding.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlm_sapo.models.moe import moe_routers

REPLAY_MODES = ("none", "r2", "r3")
FREE = -1  # a position that routes freely
_ATTR = "_vlm_sapo_routing"


class Recording:
    """The expert indices of every forward run while recording: `calls[i]` is [tokens, moe_layers, top_k] (long),
    tokens in the forward's (batch, position) row-major order."""

    def __init__(self) -> None:
        self._raw: list[list[torch.Tensor]] = []

    @property
    def calls(self) -> list[torch.Tensor]:
        return [torch.stack(layers, dim=1) for layers in self._raw]


class _Routing:
    """The hooks of one model and their state: the replay to force, the recording to fill, and agreement counts."""

    def __init__(self, routers: list[tuple[int, torch.nn.Module]]) -> None:
        self.layers = [i for i, _ in routers]
        self.top_k = int(routers[0][1].top_k)
        self.num_experts = int(routers[0][1].num_experts)
        self.forced: torch.Tensor | None = None  # [tokens, moe_layers, top_k]
        self.recording: Recording | None = None
        self.counts: torch.Tensor | None = None  # (token-layers forced, of which the router chose otherwise)
        for pos, (_, module) in enumerate(routers):
            module.register_forward_hook(functools.partial(self._hook, pos))

    def _hook(self, pos: int, module: torch.nn.Module, args: Any, output: tuple) -> tuple:
        logits, scores, idx = output
        if self.forced is not None:
            forced = self.forced[:, pos].to(idx.device)
            if forced.shape != idx.shape:
                raise ValueError(f"routing replay: {tuple(forced.shape)} replayed experts for router {pos} but its "
                                 f"forward routes {tuple(idx.shape)} (tokens, top_k): routed_experts must be aligned "
                                 f"with input_ids")
            free = forced[:, :1] < 0
            chosen = torch.where(free, idx, forced.long())
            weights = torch.softmax(logits.gather(-1, chosen).float(), dim=-1).to(scores.dtype)
            with torch.no_grad():
                replayed = ~free[:, 0]
                same = (chosen.sort(-1).values == idx.sort(-1).values).all(-1)
                counts = torch.stack([replayed.sum(), (replayed & ~same).sum()])  # stays on the device: no sync
                self.counts = counts if self.counts is None else self.counts + counts
            scores, idx = torch.where(free, scores, weights), chosen
        if self.recording is not None:
            if pos == 0:
                self.recording._raw.append([])
            self.recording._raw[-1].append(idx.detach())
        return logits, scores, idx


def _state(model: Any) -> _Routing:
    """The model's routing hooks, installed on first use; a dense model is refused."""
    from vlm_sapo.models.logprobs import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    state = lm.__dict__.get(_ATTR)
    if state is None:
        routers = moe_routers(lm)
        if not routers:
            raise ValueError(f"routing replay needs a mixture-of-experts policy; {type(lm).__name__} has no MoE "
                             f"router (a dense model routes nothing)")
        state = _Routing(routers)
        lm.__dict__[_ATTR] = state
    return state


def routing_shape(model: Any) -> tuple[int, int, int]:
    """(number of MoE layers, top_k, number of experts) of a MoE policy."""
    s = _state(model)
    return len(s.layers), s.top_k, s.num_experts


def moe_layer_indices(model: Any) -> list[int]:
    """Decoder-layer index of each MoE layer, in `routed_experts` order (vLLM reports every decoder layer)."""
    return list(_state(model).layers)


@contextlib.contextmanager
def replay_routing(model: Any, routed: torch.Tensor | None) -> Iterator[None]:
    """Force the experts `routed` ([batch, tokens, moe_layers, top_k], -1 = free) in every forward inside the block.

    The batch and token dimensions must be those of the forward's `input_ids`. `None` does nothing, so callers pass
    whatever the batch holds. Nested blocks restore the outer replay on exit (a gradient-checkpointed backward must run
    inside the block that set its forward's replay, so that the recomputed forward routes alike).
    """
    if routed is None:
        yield
        return
    state = _state(model)
    if routed.dim() != 4 or tuple(routed.shape[2:]) != (len(state.layers), state.top_k):
        raise ValueError(f"routed_experts has shape {tuple(routed.shape)}; this policy needs [batch, tokens, "
                         f"{len(state.layers)}, {state.top_k}] (moe layers, top_k)")
    if bool((routed >= state.num_experts).any()) or bool((routed < FREE).any()):
        raise ValueError(f"routed_experts holds expert ids outside -1..{state.num_experts - 1}")
    outer, state.forced = state.forced, routed.reshape(-1, *routed.shape[2:])
    try:
        yield
    finally:
        state.forced = outer


@contextlib.contextmanager
def record_routing(model: Any) -> Iterator[Recording]:
    """Record the experts of every forward inside the block (after any replay: the experts actually used)."""
    state = _state(model)
    outer, state.recording = state.recording, Recording()
    try:
        yield state.recording
    finally:
        state.recording = outer


def take_replay_counts(model: Any) -> tuple[float, float]:
    """(token-layers replayed, of which the current router would have chosen other experts) since the last call."""
    state = _state(model)
    counts, state.counts = state.counts, None
    if counts is None:
        return 0.0, 0.0
    replayed, changed = counts.tolist()
    return float(replayed), float(changed)


def routed_experts_batch(rows: Sequence[torch.Tensor | None], width: int) -> torch.Tensor:
    """Per-row routing ([tokens_i, moe_layers, top_k], from position 0 of a right-padded row) as one int16
    [rows, width, moe_layers, top_k] tensor, -1 past each row's routing."""
    shapes = {tuple(r.shape[1:]) for r in rows if r is not None}
    if len(shapes) != 1:
        raise ValueError(f"rows carry routing of shapes {sorted(shapes)}; need one (moe_layers, top_k) for all rows"
                         if shapes else "no row carries routed experts")
    layers, k = shapes.pop()
    out = torch.full((len(rows), width, layers, k), FREE, dtype=torch.int16)
    for i, r in enumerate(rows):
        if r is None:
            raise ValueError(f"row {i} carries no routed experts (the rollout engine did not record them)")
        if r.shape[0] > width:
            raise ValueError(f"row {i}: routing for {r.shape[0]} tokens, but the row has {width} columns")
        out[i, : r.shape[0]] = r.to(torch.int16)
    return out


def compact(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in the smallest unsigned dtype that holds them (uint8 up to 256 experts), on the CPU."""
    return indices.to(torch.uint8 if num_experts <= 256 else torch.int16).cpu()
