"""Token-budget micro-batches (each row once, its own images with it), the generated DeepSpeed config, the lr schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.learner.learner_batches import ROWS, make_batch, take_rows
from vlm_sapo.learner.ds_config import build_ds_config
from vlm_sapo.learner.micro_batches import plan_micro_batches
from vlm_sapo.learner.optim import lr_multiplier


def _random_mask(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Left-padded prompts + right-padded completions: each row attends one contiguous span."""
    mask = torch.zeros(rows, cols, dtype=torch.long)
    for r in range(rows):
        start = int(torch.randint(0, cols - 1, (1,), generator=gen))
        end = int(torch.randint(start + 1, cols + 1, (1,), generator=gen))
        mask[r, start:end] = 1
    return mask


@pytest.mark.parametrize("budget", [1, 40, 100, 250, 10**6])
def test_plan_covers_every_row_once_within_budget(budget):
    gen = torch.Generator().manual_seed(budget)
    for _ in range(20):
        mask = _random_mask(gen, rows=int(torch.randint(1, 12, (1,), generator=gen)), cols=50)
        plan = plan_micro_batches(mask, budget)
        assert sorted(int(r) for mb in plan for r in mb.rows) == list(range(mask.shape[0]))
        for mb in plan:
            sub = mask[mb.rows]
            assert sub[:, : mb.col_start].sum() == 0 and sub[:, mb.col_end:].sum() == 0, "dropped attended tokens"
            assert mb.padded_tokens <= budget or len(mb.rows) == 1
        if budget >= 50 * mask.shape[0]:
            assert len(plan) == 1


def test_each_row_keeps_exactly_its_own_images(small_qwen25_dir, policy_batch):
    """Slicing a row out of the batch equals processing that row alone (two images, none, one)."""
    for r in range(len(ROWS)):
        alone = make_batch(small_qwen25_dir, rows=ROWS[r : r + 1])
        sliced = take_rows(policy_batch, [r], small_qwen25_dir)
        width = int(alone["attention_mask"].sum())
        for key in ("input_ids", "attention_mask", "completion_mask", "mm_token_type_ids"):
            assert torch.equal(sliced[key][:, :width], alone[key]), key
        for key in ("pixel_values", "image_grid_thw"):
            assert (key in sliced) == (key in alone)
            if key in alone:
                assert torch.equal(sliced[key], alone[key]), key


def test_truncated_image_tokens_are_reported(small_qwen25_dir, policy_batch):
    bad = {k: v.clone() for k, v in policy_batch.items()}
    row = 3  # the two-image row: drop one image placeholder token
    image_token = int(policy_batch["input_ids"][0][policy_batch["mm_token_type_ids"][0] == 1][0])
    pos = (bad["input_ids"][row] == image_token).nonzero()[0, 0]
    bad["input_ids"][row, pos] = 0
    with pytest.raises(ValueError, match="batch row 3.*truncated"):
        take_rows(bad, [0], small_qwen25_dir)


def test_ds_config_merges_the_user_file(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": True}}))
    cfg = build_ds_config(zero_stage=2, bf16=False, grad_clip=1.0, user_config=user)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cfg["gradient_clipping"] == 1.0 and cfg["managed_gradient_accumulation"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg

    yaml_file = tmp_path / "ds.yaml"
    yaml_file.write_text("zero_optimization:\n  overlap_comm: false\n")
    assert build_ds_config(zero_stage=3, bf16=False, grad_clip=None, user_config=yaml_file)["zero_optimization"] == {
        "stage": 3, "overlap_comm": False}

    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match=r"ds\.json.*\['optimizer'\]"):
        build_ds_config(zero_stage=2, bf16=False, grad_clip=1.0, user_config=user)
    user.write_text("{not json")
    with pytest.raises(ValueError, match=r"ds\.json: cannot parse"):
        build_ds_config(zero_stage=2, bf16=False, grad_clip=1.0, user_config=user)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_ds_config(zero_stage=2, bf16=False, grad_clip=1.0, user_config=tmp_path / "missing.json")


def test_lr_schedules():
    warm = lr_multiplier("constant", warmup_steps=4, total_steps=100)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_multiplier("cosine", warmup_steps=2, total_steps=12)
    assert cos(2) == 1.0 and cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)
    assert cos(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    lin = lr_multiplier("linear", warmup_steps=0, total_steps=10)
    assert [lin(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_multiplier("step", 0, 10)
