"""Mixture-of-experts policies (Qwen3-VL-MoE): detection, the routers, and the experts' checkpoint layout.

transformers holds a Qwen3-VL-MoE layer's experts as two 3-D tensors, `gate_up_proj` [experts, 2 x moe_inter, hidden]
and `down_proj` [experts, hidden, moe_inter]; the released checkpoints (and vLLM's loader, `is_fused_checkpoint_
transposed`) store them transposed, [experts, hidden, 2 x moe_inter] and [experts, moe_inter, hidden]. transformers
transposes on load only when the shapes differ (`Transpose(check_dims=True)`), and for the same reason its
`save_pretrained` transposes back only when the model's parameter has a different shape from the tensor saved
(checked with transformers 5.19: a plain model saves its in-memory layout, a ZeRO-3-partitioned one the released
layout), so a saved model would not always load in vLLM. `save_policy` writes the released layout, and the vLLM engine transposes
the tensors it streams (`checkpoint_layout`). A config where the two layouts have the same shape (2 x moe_inter ==
hidden) cannot be told apart on load and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MOE_MODEL_TYPES = ("qwen3_vl_moe",)
# Parameter-name suffixes of the experts' fused weights, stored transposed in the released checkpoints.
TRANSPOSED_EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_moe(model_or_config: Any) -> bool:
    """True for a mixture-of-experts policy (a model, its config, or a `model_type` string)."""
    if isinstance(model_or_config, str):
        return model_or_config in MOE_MODEL_TYPES
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in MOE_MODEL_TYPES


def check_layouts_distinct(hidden: int, inter: int) -> None:
    """Refuse sizes whose experts' in-memory and checkpoint layouts have equal shapes (ambiguous on load)."""
    if 2 * inter == hidden or inter == hidden:
        raise ValueError(f"qwen3_vl_moe: moe_intermediate_size {inter} with hidden_size {hidden} makes an expert "
                         "weight square, so transformers cannot tell the checkpoint layout from its own on load; "
                         "choose another moe_intermediate_size")


def checkpoint_layout(name: str, tensor: torch.Tensor, hidden: int) -> torch.Tensor:
    """A transformers-named tensor in the released checkpoints' layout, whichever layout it comes in: the experts'
    `gate_up_proj` as [experts, hidden, 2 x inter], `down_proj` as [experts, inter, hidden]."""
    if tensor.dim() == 3 and (name.endswith(TRANSPOSED_EXPERT_WEIGHTS[0]) and tensor.shape[1] != hidden
                              or name.endswith(TRANSPOSED_EXPERT_WEIGHTS[1]) and tensor.shape[2] != hidden):
        return tensor.transpose(1, 2).contiguous()
    return tensor


def save_policy(model: Any, folder: str | os.PathLike, **kwargs: Any) -> None:
    """`model.save_pretrained(folder, **kwargs)`, with a MoE model's experts rewritten in the released layout so that
    vLLM loads the folder too (transformers loads either layout)."""
    model.save_pretrained(folder, **kwargs)
    if not is_moe(model):
        return
    # transformers' own revert transposes only when the model's parameter shape differs from the saved one, which
    # depends on the parameter being materialised (not under ZeRO-3): fix the layout from the shapes instead.
    hidden = int(model.config.get_text_config().hidden_size)
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if not any(n.endswith(TRANSPOSED_EXPERT_WEIGHTS) for n in names):
                continue
            metadata = f.metadata()
            tensors = {n: checkpoint_layout(n, f.get_tensor(n), hidden) for n in names}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def moe_routers(model: Any) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every sparse MoE block of the language model, in layer order."""
    from vlm_sapo.models.logprobs import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    layers = getattr(getattr(lm.model, "language_model", None), "layers", None)
    if layers is None:
        return []
    out = []
    for i, layer in enumerate(layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            out.append((i, gate))
    return out


def moe_layer_ids(config: Any) -> list[int]:
    """Decoder layers that hold a sparse MoE block, by transformers' rule (`Qwen3VLMoeTextDecoderLayer`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if int(getattr(text, "num_experts", 0) or 0) <= 0:
        return []
    skip, step = set(getattr(text, "mlp_only_layers", None) or []), int(getattr(text, "decoder_sparse_step", 1))
    return [i for i in range(int(text.num_hidden_layers)) if i not in skip and (i + 1) % step == 0]
