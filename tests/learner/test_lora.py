"""LoRA through peft: only adapters train, the merged weights for the rollout equal W + B A * alpha / r exactly where
adapters are (and nothing else moves), and a plain transformers model loaded with them reproduces the policy."""

from __future__ import annotations

import pytest
import torch

from tests.learner.learner_batches import load_model, make_learner, weights
from vlm_sapo.learner import Objective, UpdateBatch

ADV = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])
LM_TARGETS = ("q_proj", "v_proj", "gate_proj")


def _model_logprobs(model, batch):
    from vlm_sapo.models.logprobs import token_logprobs

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        return token_logprobs(model, inputs, completion_mask=batch["completion_mask"])[0]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_update_and_merged_weights(small_qwen25_dir, policy_batch, zero_stage):
    base = {n: p.detach().clone() for n, p in load_model(small_qwen25_dir).named_parameters()}
    rank, alpha = 4, 8.0
    learner = make_learner(small_qwen25_dir, zero_stage=zero_stage, lr=1e-2, lora=dict(rank=rank, alpha=alpha, target_modules=list(LM_TARGETS)),
                           freeze_vision_tower=True, micro_batch_tokens=150)
    trainable = [n for n, p in learner.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(".visual." in n for n in trainable), "a frozen vision tower must get no adapters"

    for _ in range(2):
        old = learner.compute_logprobs(policy_batch)
        assert learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))["skipped"] == 0
    merged = weights(learner)
    assert set(merged) == set(base), "merged weights must carry exactly the HF state_dict names"

    adapted = {n for n in base if n.startswith("model.language_model.") and n.endswith(".weight")
               and n.rsplit(".", 2)[-2] in LM_TARGETS}
    assert len(adapted) == 2 * len(LM_TARGETS)  # 2 layers
    for name, tensor in merged.items():
        assert tensor.shape == base[name].shape
        if name not in adapted:
            assert torch.equal(tensor, base[name]), f"{name} changed but has no adapter"
    # B A * alpha / r, recomputed here from the adapter tensors themselves
    for name in sorted(adapted):
        prefix = "base_model.model." + name.removesuffix(".weight")
        with _gathered(learner, [f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"]) as (a, b):
            expected = base[name] + (b @ a) * (alpha / rank)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)
        assert not torch.equal(merged[name], base[name])

    # the merged weights in a plain transformers model give the learner's log-probs; adapters off give the base's
    plain = load_model(small_qwen25_dir)
    plain.load_state_dict(merged, strict=False)
    mask = policy_batch["completion_mask"].bool()
    torch.testing.assert_close(_model_logprobs(plain, policy_batch)[mask],
                               learner.compute_logprobs(policy_batch)[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(_model_logprobs(load_model(small_qwen25_dir), policy_batch)[mask],
                               learner.compute_logprobs(policy_batch, adapters=False)[mask], atol=2e-5, rtol=0)


class _gathered:
    """Full copies of named policy parameters (gathered under ZeRO-3)."""

    def __init__(self, learner, names):
        params = dict(learner.policy.named_parameters())
        self.params = [params[n] for n in names]
        self.zero3 = learner.zero_stage == 3

    def __enter__(self):
        if self.zero3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(self.params)
            self.ctx.__enter__()
        return [p.detach().clone() for p in self.params]

    def __exit__(self, *exc):
        if self.zero3:
            self.ctx.__exit__(*exc)


def test_lora_needs_matching_targets(small_qwen25_dir):
    with pytest.raises(ValueError, match="match no layer"):
        make_learner(small_qwen25_dir, lora=dict(rank=4, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="needs a LoRA learner"):
        make_learner(small_qwen25_dir).compute_logprobs({}, adapters=False)
