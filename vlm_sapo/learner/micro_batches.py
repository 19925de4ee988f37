"""Splitting a policy batch into micro-batches that fit a token budget.

A batch is the dict `build_policy_inputs` makes: per-row tensors `[B, L]` (input_ids, attention_mask, completion_mask,
mm_token_type_ids) plus the images of all rows concatenated (pixel_values `[patches, dim]`, image_grid_thw `[images, 3]`).
Videos likewise (pixel_values_videos, video_grid_thw and, per video, second_per_grid_ts).
Rows are sorted by length and packed greedily so each micro-batch's padded size (rows x span) stays within the budget;
each micro-batch keeps only the columns some of its rows attend to, so short rows do not pay for long ones. A row's
images travel with it: the row's `<|image_pad|>` count says how many of the next `image_grid_thw` entries are its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (pixel key, grid key, placeholder-token config attribute) for each visual modality Qwen-VL accepts.
_VISUAL = (("pixel_values", "image_grid_thw", "image_token_id"),
           ("pixel_values_videos", "video_grid_thw", "video_token_id"))
# Per-entry tensors of a grid key (one value per video: Qwen2.5-VL's seconds per temporal patch).
_PER_GRID_ENTRY = {"second_per_grid_ts": "video_grid_thw"}


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor  # int64 indices into the batch's rows
    col_start: int  # columns [col_start, col_end) of the batch are kept
    col_end: int

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_end)

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * (self.col_end - self.col_start)


def row_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Each row's [first, last + 1) attended column; prompts are left-padded and completions right-padded."""
    spans = []
    for i, row in enumerate(attention_mask.bool()):
        idx = row.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"batch row {i} has no attended token (attention_mask is all zero)")
        spans.append((int(idx[0]), int(idx[-1]) + 1))
    return spans


def plan_micro_batches(attention_mask: torch.Tensor, token_budget: int,
                       rows: torch.Tensor | None = None) -> list[MicroBatch]:
    """Greedy packing by descending length; a row longer than the budget gets a micro-batch of its own.

    `rows` (bool `[B]`) limits the plan to those rows (the learner leaves out rows with nothing to score).
    """
    if token_budget <= 0:
        raise ValueError(f"micro-batch token budget must be positive, got {token_budget}")
    spans = row_spans(attention_mask)
    keep = range(len(spans)) if rows is None else rows.nonzero().flatten().tolist()
    order = sorted(keep, key=lambda i: (spans[i][1] - spans[i][0], i), reverse=True)
    plans: list[MicroBatch] = []
    rows: list[int] = []
    lo = hi = 0
    for i in order:
        s, e = spans[i]
        if rows:
            nlo, nhi = min(lo, s), max(hi, e)
            if (len(rows) + 1) * (nhi - nlo) <= token_budget:
                rows.append(i)
                lo, hi = nlo, nhi
                continue
            plans.append(MicroBatch(torch.tensor(sorted(rows)), lo, hi))
        rows, lo, hi = [i], s, e
    if rows:
        plans.append(MicroBatch(torch.tensor(sorted(rows)), lo, hi))
    return plans


def _visual_rows(batch: dict, token_id: int, grid_key: str, merge_size: int) -> list[list[int]] | None:
    """For each row, the indices of its entries in `batch[grid_key]` (None when the batch has none)."""
    grid = batch.get(grid_key)
    if grid is None:
        return None
    per_image_tokens = (grid.prod(dim=-1) // (merge_size**2)).tolist()
    counts = (batch["input_ids"] == token_id).sum(dim=1).tolist()
    out: list[list[int]] = []
    nxt = 0
    for r, count in enumerate(counts):
        mine = []
        while count > 0:
            if nxt >= len(per_image_tokens):
                raise ValueError(f"batch row {r}: {count} placeholder tokens (id {token_id}) left but {grid_key} has "
                                 f"no more entries ({len(per_image_tokens)} in all)")
            if per_image_tokens[nxt] > count:
                raise ValueError(f"batch row {r}: {count} placeholder tokens (id {token_id}) left, but {grid_key} "
                                 f"entry {nxt} needs {per_image_tokens[nxt]}; were image tokens truncated?")
            count -= per_image_tokens[nxt]
            mine.append(nxt)
            nxt += 1
        out.append(mine)
    if nxt != len(per_image_tokens):
        raise ValueError(f"{grid_key} has {len(per_image_tokens)} entries but the rows' placeholder tokens use {nxt}")
    return out


@dataclass(frozen=True)
class BatchLayout:
    """Where each row's images lie in the concatenated visual tensors, computed once per batch."""

    visual: dict[str, tuple[list[list[int]], torch.Tensor]]  # grid key -> (row -> grid entries, patch offsets)


def batch_layout(batch: dict, *, image_token_id: int | None, video_token_id: int | None,
                 merge_size: int) -> BatchLayout:
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise KeyError(f"policy batch has no {key!r} (keys: {sorted(batch)})")
    ids = {"image_token_id": image_token_id, "video_token_id": video_token_id}
    visual = {}
    for pix_key, grid_key, id_attr in _VISUAL:
        if batch.get(grid_key) is None:
            continue
        if ids[id_attr] is None:
            raise ValueError(f"batch has {grid_key} but the model config has no {id_attr}")
        if batch.get(pix_key) is None:
            raise KeyError(f"batch has {grid_key} but no {pix_key}")
        rows = _visual_rows(batch, ids[id_attr], grid_key, merge_size)
        patches = batch[grid_key].prod(dim=-1)
        if int(patches.sum()) != batch[pix_key].shape[0]:
            raise ValueError(f"{pix_key} has {batch[pix_key].shape[0]} patch rows but {grid_key} describes "
                             f"{int(patches.sum())}")
        offsets = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        visual[grid_key] = (rows, offsets)
    return BatchLayout(visual)


def slice_batch(batch: dict, mb: MicroBatch, layout: BatchLayout) -> dict:
    """The micro-batch's rows and columns, with exactly its rows' images."""
    n_rows, n_cols = batch["input_ids"].shape
    visual_keys = {k for pair in _VISUAL for k in pair[:2]} | set(_PER_GRID_ENTRY)
    out: dict = {}
    for key, value in batch.items():
        if key in visual_keys or value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"policy batch key {key!r}: expected a tensor, got {type(value).__name__}")
        if value.dim() >= 2 and value.shape[0] == n_rows and value.shape[1] == n_cols:
            out[key] = value[mb.rows][:, mb.cols]
        elif value.shape[0] == n_rows:
            out[key] = value[mb.rows]
        else:
            raise ValueError(f"policy batch key {key!r} has shape {tuple(value.shape)}, which is neither per row "
                             f"[{n_rows}, ...] nor a known visual tensor")
    for pix_key, grid_key, _ in _VISUAL:
        if grid_key not in layout.visual:
            continue
        rows, offsets = layout.visual[grid_key]
        entries = [e for r in mb.rows.tolist() for e in rows[r]]
        if not entries:
            continue
        grid = batch[grid_key]
        out[grid_key] = grid[entries]
        out[pix_key] = torch.cat([batch[pix_key][offsets[e]:offsets[e + 1]] for e in entries])
        for key, of in _PER_GRID_ENTRY.items():
            if of == grid_key and batch.get(key) is not None:
                out[key] = torch.as_tensor(batch[key])[entries]
    return out
