"""The module DeepSpeed (or `TorchEngine`) wraps: the policy's chunked token log-probs, with the blank-image pass that
keeps data-parallel ranks' collective calls in step."""

from __future__ import annotations

from typing import Any

import torch

from vlm_sapo.learner.weights import hf_model
from vlm_sapo.models.logprobs import token_logprobs
from vlm_sapo.models.vision import vision_tower


class TokenLogprobs(torch.nn.Module):
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
                    blank.append(0.0 * sum(t.float().sum() for t in tensors_in(out)))

            handle = model.get_input_embeddings().register_forward_hook(after_embedding)
        try:
            logp, ent = token_logprobs(self.policy, inputs, temperature=temperature, chunk_size=chunk_size,
                                       return_entropy=entropy, completion_mask=mask)
        finally:
            if handle is not None:
                handle.remove()
        return (logp + blank[0] if blank else logp), ent


def tensors_in(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, or a dict-like ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in tensors_in(v)]


def vision_dummy(config: Any, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A blank image of merge x merge patches in the vision tower's input layout (None for a text-only model)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    merge = int(getattr(vision, "spatial_merge_size", 2))
    dim = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    return torch.zeros(merge * merge, dim, dtype=dtype or torch.float32), torch.tensor([[1, merge, merge]])
