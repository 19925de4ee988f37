"""How a loss reduces per-token values to one number: the papers differ exactly here, so each loss declares its mode.

``aggregation_weight`` lets a learner that splits a batch into micro-batches (or ranks) weight each part so that the
sum equals the loss over the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
AGGREGATIONS = (SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM)


def bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def aggregate(values: Tensor, mask: Tensor, mode: str, *, max_length: int | None = None) -> Tensor:
    """Reduce per-token ``values [batch, tokens]`` to a scalar over the tokens where ``mask`` is set.

    ``seq-mean-token-mean``: token mean within each sequence, then mean over non-empty sequences (GRPO, GSPO, SAPO).
    ``token-mean``: mean over all valid tokens of the batch (DAPO, CISPO); long answers weigh more.
    ``seq-mean-token-sum-norm``: token sum per sequence divided by the constant ``max_length``, then mean over
    non-empty sequences (Dr. GRPO): no length bias in either direction.
    """
    valid = bool_mask(mask)
    values = torch.where(valid, values, 0.0)
    if mode == TOKEN_MEAN:
        return values.sum() / valid.sum().clamp(min=1)
    lengths = valid.sum(-1)
    num_seqs = (lengths > 0).sum().clamp(min=1)
    if mode == SEQ_MEAN_TOKEN_MEAN:
        return (values.sum(-1) / lengths.clamp(min=1)).sum() / num_seqs
    if mode == SEQ_MEAN_TOKEN_SUM_NORM:
        if max_length is None or max_length < 1:
            raise ValueError(f"aggregation {mode!r} needs max_length >= 1, got {max_length!r}")
        return (values.sum(-1) / max_length).sum() / num_seqs
    raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def aggregation_weight(mode: str, mask: Tensor) -> int:
    """What ``aggregate(mode)`` divides by on ``mask``: valid tokens for ``token-mean``, non-empty sequences otherwise.

    A learner accumulating micro-batches (or averaging over ranks) multiplies each part's loss by
    ``aggregation_weight(part) / sum of aggregation_weight(parts)``; the sum is then exactly the whole batch's loss.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")
    valid = bool_mask(mask)
    if mode == TOKEN_MEAN:
        return int(valid.sum())
    return int((valid.sum(-1) > 0).sum())
