"""The KL reference policy: the frozen initial weights, scored chunk by chunk exactly as the policy is.

Under LoRA the reference is the policy itself with its adapters disabled (`Learner.compute_logprobs(adapters=False)`),
so it costs nothing. Otherwise it is a copy of the initial model, taken before LoRA, vision freezing and DeepSpeed
(which, under ZeRO-3, partitions the policy), and held whole on every rank in the learner's dtype: one more copy of
the parameters, n_params x 2 bytes in bf16 (x 4 in fp32), per rank, whatever the ZeRO stage. No gradients, optimizer
state or activations are kept for it. The trainer builds it only when `algorithm.kl_coef > 0`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from vlm_sapo.learner.weights import hf_model
from vlm_sapo.models.logprobs import token_logprobs


class ReferencePolicy:
    """A frozen copy of a policy; `logprobs` is `token_logprobs` (chunked over completion tokens) under no_grad."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(hf_model(model))
        self.model.requires_grad_(False).eval()
        self.dtype: torch.dtype | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ReferencePolicy:
        """Move to the learner's device and, for bf16 learners, cast the parameters to bf16 (buffers keep theirs)."""
        self.model.to(device)
        if dtype is not None:
            for p in self.model.parameters():
                p.data = p.data.to(dtype)
        self.dtype = dtype
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the copy's parameters (tied parameters once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def logprobs(self, inputs: dict[str, Any], mask: torch.Tensor, *, temperature: float,
                 chunk_size: int) -> torch.Tensor:
        if self.dtype is not None:
            inputs = {k: v.to(self.dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        logp, _ = token_logprobs(self.model, inputs, temperature=temperature, chunk_size=chunk_size,
                                 completion_mask=mask)
        return logp
