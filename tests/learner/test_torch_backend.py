"""`Learner(backend="torch")`, the path for machines without DeepSpeed: the same update as the hand-written AdamW step
(micro-batches, weight decay, clipping), the same non-finite skip, exact resume from its own checkpoint files, and
bf16 parameters over fp32 master weights."""

from __future__ import annotations

import pytest
import torch

from tests.learner.learner_batches import load_model, make_learner, weights
from tests.learner.test_update import (
    ADV,
    LINEAR_ADAM,
    assert_same_update,
    naive_logprobs,
    perturbed_old,
    ref_sapo,
    reference_step,
)
from vlm_sapo.checkpoint import load_checkpoint, save_checkpoint
from vlm_sapo.learner import Objective, UpdateBatch


@pytest.fixture
def old(small_qwen25_dir, policy_batch):
    with torch.no_grad():
        return perturbed_old(naive_logprobs(load_model(small_qwen25_dir), policy_batch), policy_batch["completion_mask"])


def test_torch_backend_matches_hand_written_adamw_step(small_qwen25_dir, policy_batch, old):
    mask = policy_batch["completion_mask"]
    ref_loss, ref_norm, before, ref_after = reference_step(
        small_qwen25_dir, policy_batch, lambda lp: ref_sapo(lp, old, ADV, mask),
        weight_decay=0.1, grad_clip=0.05, **LINEAR_ADAM)
    assert ref_norm > 0.05, "the clip must be active for this test to check it"
    learner = make_learner(small_qwen25_dir, backend="torch", weight_decay=0.1, grad_clip=0.05,
                           micro_batch_tokens=100, **LINEAR_ADAM)
    assert learner.zero_stage == 0 and type(learner.engine).__name__ == "TorchEngine"
    m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    assert m["micro_batches"] >= 3 and m["skipped"] == 0
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert_same_update(before, weights(learner), ref_after)


def test_torch_backend_skips_nonfinite_and_resumes_exactly(small_qwen25_dir, policy_batch, old, tmp_path):
    kwargs = dict(backend="torch", lr=1e-3, warmup_steps=3, total_steps=10, micro_batch_tokens=150)
    a = make_learner(small_qwen25_dir, **kwargs)
    a.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    w0, lr0 = weights(a), a.lr
    bad = ADV.clone()
    bad[1] = float("nan")
    m = a.update(UpdateBatch(policy_batch, bad, old), Objective("sapo"))
    assert m["skipped"] == 1 and a.nonfinite_in_a_row == 1 and a.lr == lr0
    assert all(torch.equal(w0[n], t) for n, t in weights(a).items())

    path = save_checkpoint(a, tmp_path, 1, {"step": 1})
    then = [a.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo")) for _ in range(2)]
    b = make_learner(small_qwen25_dir, **kwargs)
    assert load_checkpoint(b, path) == {"step": 1} and b.nonfinite_in_a_row == 1 and b.updates == 1
    again = [b.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo")) for _ in range(2)]
    assert [(x["loss"], x["lr"], x["grad_norm"]) for x in again] == [(x["loss"], x["lr"], x["grad_norm"]) for x in then]
    assert all(torch.equal(t, weights(a)[n]) for n, t in weights(b).items())


def test_torch_backend_bf16_keeps_fp32_masters(small_qwen25_dir, policy_batch, old):
    mask = policy_batch["completion_mask"]
    learner = make_learner(small_qwen25_dir, backend="torch", bf16=True, lr=1e-3, micro_batch_tokens=150)
    assert {p.dtype for p in learner.policy.parameters()} == {torch.bfloat16}
    masters = [p for g in learner.optimizer.param_groups for p in g["params"]]
    assert masters and {p.dtype for p in masters} == {torch.float32}
    before = [p.detach().clone() for p in masters]
    m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    with torch.no_grad():
        ref = float(ref_sapo(naive_logprobs(load_model(small_qwen25_dir), policy_batch), old, ADV, mask))
    assert m["skipped"] == 0 and m["loss"] == pytest.approx(ref, rel=2e-2)
    # Adam's first step moves every trained weight by about lr in fp32; in bf16 alone most of it would round away
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(masters, before)]
    assert min(moved) > 0.5e-3
    pairs = learner.engine._pairs
    assert all(torch.equal(p, master.to(torch.bfloat16)) for p, master in pairs)


def test_torch_backend_refuses_more_than_one_process(small_qwen25_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        make_learner(small_qwen25_dir, backend="torch")
