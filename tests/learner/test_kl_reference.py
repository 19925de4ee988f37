"""The KL reference policy is the frozen initial weights: its logprobs equal a naive full-vocabulary forward of the
initial checkpoint however far the policy has moved (a copy without LoRA, the adapters switched off with LoRA), and
the KL term the update reports equals k1/k2/k3 computed here by hand from the two policies' logprobs."""

from __future__ import annotations

import pytest
import torch

from tests.learner.learner_batches import load_model, make_learner
from tests.learner.test_update import ADV, naive_logprobs
from vlm_sapo.learner import Objective, UpdateBatch


def _hand_kl(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, estimator: str) -> float:
    """Schulman (2020) with log rho = log p_ref - log p, token mean per sequence then mean (SAPO's aggregation)."""
    total = 0.0
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        log_rho = (ref[i][m] - logp[i][m]).double()
        per_token = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": torch.exp(log_rho) - 1 - log_rho}[estimator]
        total += float(per_token.mean())
    return total / logp.shape[0]


def test_reference_is_the_initial_weights_and_the_kl_matches_a_hand_computation(small_qwen25_dir, policy_batch):
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        initial = naive_logprobs(load_model(small_qwen25_dir), policy_batch)
    learner = make_learner(small_qwen25_dir, zero_stage=2, kl_reference=True, micro_batch_tokens=100, lr=3e-3)
    n_params = sum(p.numel() for p in load_model(small_qwen25_dir).parameters())
    assert learner.reference.nbytes == 4 * n_params  # one fp32 copy of every parameter
    torch.testing.assert_close(learner.compute_ref_logprobs(policy_batch) * mask, initial * mask, atol=2e-5, rtol=0)

    learner.update(UpdateBatch(policy_batch, ADV), Objective("sapo"))  # the policy moves; the reference must not
    for estimator, coef in (("k3", 0.5), ("k1", 0.2), ("k2", 1.0)):
        ref = learner.compute_ref_logprobs(policy_batch)
        torch.testing.assert_close(ref * mask, initial * mask, atol=2e-5, rtol=0)
        logp = learner.compute_logprobs(policy_batch)
        assert float(((logp - ref) * mask).abs().max()) > 1e-3, "the policy must have moved for this test to bite"
        m = learner.update(UpdateBatch(policy_batch, ADV, ref_logp=ref),
                           Objective("sapo", kl_coef=coef, kl_estimator=estimator))
        want = _hand_kl(logp, ref, mask, estimator)
        assert m["kl"] == pytest.approx(want, rel=1e-4, abs=1e-7), estimator
        assert m["loss"] - m["policy_loss"] == pytest.approx(coef * want, rel=1e-4, abs=1e-7), estimator


def test_lora_reference_is_the_base_model_without_a_copy(small_qwen25_dir, policy_batch):
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        initial = naive_logprobs(load_model(small_qwen25_dir), policy_batch)
    learner = make_learner(small_qwen25_dir, zero_stage=2, kl_reference=True, lora=dict(rank=4, alpha=8.0), lr=1e-2)
    assert learner.reference is None
    learner.update(UpdateBatch(policy_batch, ADV), Objective("sapo"))
    ref = learner.compute_ref_logprobs(policy_batch)
    torch.testing.assert_close(ref * mask, initial * mask, atol=2e-5, rtol=0)
    assert float(((learner.compute_logprobs(policy_batch) - ref) * mask).abs().max()) > 1e-4


def test_no_reference_unless_asked(small_qwen25_dir, policy_batch):
    learner = make_learner(small_qwen25_dir, zero_stage=2)
    assert learner.reference is None
    with pytest.raises(ValueError, match="kl_reference=True"):
        learner.compute_ref_logprobs(policy_batch)
