"""Atomic checkpoints: exact resume (weights, AdamW moments, lr schedule, RNG), corrupt/truncated/half-written
checkpoints never loaded, keep-last-K, and a Hugging Face export that transformers reloads to identical logits."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from tests.learner.learner_batches import load_model, make_learner, take_rows, weights
from vlm_sapo.checkpoint import (
    CheckpointError,
    export_hf,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from vlm_sapo.learner import Objective, UpdateBatch

ADV = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])
SCHEDULE = dict(lr=5e-3, lr_schedule="cosine", warmup_steps=3, total_steps=6, weight_decay=0.01,
                micro_batch_tokens=150)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _latest(root):
    """latest_valid_checkpoint and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = latest_valid_checkpoint(root)
    return path, " | ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))


def _step(learner, batch):
    return learner.update(UpdateBatch(batch, ADV, learner.compute_logprobs(batch)), Objective("sapo"))


def test_resume_continues_exactly(small_qwen25_dir, policy_batch, tmp_path):
    a = make_learner(small_qwen25_dir, zero_stage=2, **SCHEDULE)
    _step(a, policy_batch)
    state = {"step": 1, "data_position": 5, "note": "after one update"}
    path = save_checkpoint(a, tmp_path, 1, state)
    assert path == tmp_path / "step_1" and verify_checkpoint(path)["step"] == 1
    expected_draws = _draws()
    m_uninterrupted = [_step(a, policy_batch) for _ in range(2)]
    w_uninterrupted = weights(a)
    del a

    b = make_learner(small_qwen25_dir, zero_stage=2, **SCHEDULE)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert latest_valid_checkpoint(tmp_path) == path
    assert load_checkpoint(b, path) == state
    assert _draws() == expected_draws
    assert b.updates == 1
    m_resumed = [_step(b, policy_batch) for _ in range(2)]
    for m_u, m_r in zip(m_uninterrupted, m_resumed):
        assert (m_r["loss"], m_r["lr"], m_r["grad_norm"]) == (m_u["loss"], m_u["lr"], m_u["grad_norm"])
    assert [m["lr"] for m in m_resumed] == pytest.approx([SCHEDULE["lr"] * 2 / 3, SCHEDULE["lr"]])  # warm-up 2 and 3
    assert all(torch.equal(t, w_uninterrupted[n]) for n, t in weights(b).items())


class _CrashingLearner:
    """The learner as seen by save_checkpoint, dying right after writing its files (a power cut mid-save)."""

    def __init__(self, learner):
        self.learner = learner

    def save_state(self, folder):
        self.learner.save_state(folder)
        raise KeyboardInterrupt("power cut")


def test_broken_checkpoints_are_never_loaded_and_only_k_are_kept(small_qwen25_dir, policy_batch, tmp_path):
    learner = make_learner(small_qwen25_dir, zero_stage=2, **SCHEDULE)
    for step in (1, 2, 3, 4):
        _step(learner, policy_batch)
        save_checkpoint(learner, tmp_path, step, {"step": step}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_3", "step_4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3", "step_4"]  # no temporary left over

    # a save that dies half-way leaves only a hidden temporary folder: never listed, never loaded
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_CrashingLearner(learner), tmp_path, 5, {"step": 5}, keep_last=3)
    assert (tmp_path / ".step_5.tmp").is_dir() and not (tmp_path / "step_5").exists()
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_4"

    # truncated: the newest is skipped with a warning
    biggest = max((p for p in (tmp_path / "step_4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    path, warned = _latest(tmp_path)
    assert path == tmp_path / "step_3" and "step_4" in warned and "truncated" in warned
    # corrupt at the same size: caught by the checksum
    state_file = tmp_path / "step_3" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"step": 3', '"step": 7'))
    path, warned = _latest(tmp_path)
    assert path == tmp_path / "step_2" and "step_3" in warned and "sha256" in warned
    # a step folder without a manifest (copied by hand, or from another tool) is not trusted either
    (tmp_path / "step_9").mkdir()
    (tmp_path / "step_9" / "trainer_state.json").write_text(json.dumps({"step": 9}))
    path, warned = _latest(tmp_path)
    assert path == tmp_path / "step_2" and "step_9: no manifest.json" in warned
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(learner, tmp_path / "step_3")
    assert load_checkpoint(learner, tmp_path / "step_2") == {"step": 2}

    # the next save clears the crashed temporary folder and prunes to K (by step number, broken ones included)
    save_checkpoint(learner, tmp_path, 10, {"step": 10}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_9"]
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_10"


def test_trainer_state_must_be_json(small_qwen25_dir, tmp_path):
    learner = make_learner(small_qwen25_dir, zero_stage=2)
    with pytest.raises(TypeError, match="trainer_state must be JSON-serialisable"):
        save_checkpoint(learner, tmp_path, 1, {"step": torch.tensor(1)})
    assert latest_valid_checkpoint(tmp_path) is None


@pytest.mark.parametrize("lora", [False, True])
def test_hf_export_reloads_with_identical_logits(small_qwen25_dir, policy_batch, tmp_path, lora):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = dict(lora=dict(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])) if lora else {}
    learner = make_learner(small_qwen25_dir, zero_stage=2, lr=1e-2, micro_batch_tokens=150, **kwargs)
    _step(learner, policy_batch)
    out = export_hf(learner, small_qwen25_dir, tmp_path / "hf")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    small = take_rows(policy_batch, [2, 4], small_qwen25_dir)  # text-only and one image: full-vocabulary logits
    inputs = {k: small[k] for k in keys}
    with torch.no_grad():
        got = reloaded(**inputs).logits
        if lora:  # the learner's own forward runs base + adapter branches: equal up to rounding
            want = learner.policy(**inputs).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, learner.policy(**inputs).logits)
    assert not torch.equal(got, load_model(small_qwen25_dir)(**inputs).logits), "export holds the trained weights"

    src, dst = AutoProcessor.from_pretrained(small_qwen25_dir), AutoProcessor.from_pretrained(out)
    text = src.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                   add_generation_prompt=True)
    assert dst.tokenizer(text)["input_ids"] == src.tokenizer(text)["input_ids"]
    assert (out / "generation_config.json").is_file()
