"""The MoE policy in the learner: routing replay (R2) through micro-batches against a hand-written reference, what the
router's gradient reaches under replay, ZeRO-3, LoRA, and the HF export's expert layout.

The small Qwen3-VL-MoE has 2 layers of 4 experts, top-2. "Moved" models have their routers' weights perturbed, so
that the current router would pick other experts for some tokens than the recorded (old-policy) ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.learner.learner_batches import load_model, make_batch, make_learner, weights
from tests.learner.test_update import (
    LINEAR_ADAM,
    assert_same_update,
    naive_logprobs,
    perturbed_old,
    ref_sapo,
    reference_step,
)
from vlm_sapo.learner import Objective, UpdateBatch
from vlm_sapo.models.logprobs import token_logprobs
from vlm_sapo.models.moe import save_policy
from vlm_sapo.models.routing import record_routing, replay_routing, take_replay_counts

ADV = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])


@pytest.fixture(scope="module")
def moe_batch(small_qwen3_moe_dir):
    return make_batch(small_qwen3_moe_dir)


def _routing(model, batch) -> torch.Tensor:
    """The experts a plain (free) forward routes every token to, [B, T, layers, top_k]."""
    with torch.no_grad(), record_routing(model) as rec:
        token_logprobs(model, batch)
    return rec.calls[0].view(*batch["input_ids"].shape, *rec.calls[0].shape[1:])


def _move_routers(model, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return model


def _moved_dir(src, dst):
    save_policy(_move_routers(load_model(src)), dst)
    for f in src.iterdir():
        if not (dst / f.name).exists():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _attended_and_scored(batch):
    from vlm_sapo.learner.micro_batches import row_spans

    keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for i, (s, e) in enumerate(row_spans(batch["attention_mask"])):
        keep[i, s:e] = bool(batch["completion_mask"][i].any())
    return keep


def test_r2_routing_of_the_old_policy_pass_through_micro_batches(small_qwen3_moe_dir, moe_batch):
    """compute_logprobs(return_routing=True) over micro-batches records what one plain forward routes (every
    attended token of every scored row; padding is routed too and never matters), and replaying it on an unchanged
    policy changes nothing."""
    learner = make_learner(small_qwen3_moe_dir, zero_stage=2, micro_batch_tokens=100)
    logp, routed = learner.compute_logprobs(moe_batch, return_routing=True)
    ref = _routing(load_model(small_qwen3_moe_dir), moe_batch)
    keep = _attended_and_scored(moe_batch)
    assert routed.dtype == torch.int16 and routed.shape == (*moe_batch["input_ids"].shape, 2, 2)
    assert torch.equal(routed[keep].long().sort(-1).values, ref[keep].sort(-1).values)
    replayed = learner.compute_logprobs({**moe_batch, "routed_experts": routed})
    mask = moe_batch["completion_mask"].bool()
    torch.testing.assert_close(replayed[mask], logp[mask], atol=1e-6, rtol=0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_r2_update_matches_a_replayed_reference_step(small_qwen3_moe_dir, moe_batch, tmp_path, zero_stage):
    """The old policy's routing replayed in an update of a policy whose routers moved: the learner (micro-batches,
    DeepSpeed ZeRO-2 and ZeRO-3) equals a whole-batch AdamW step on a forward under the same replay, and the replay
    really overrode the current router on some tokens (without it the moved policy scores differently)."""
    routed = _routing(load_model(small_qwen3_moe_dir), moe_batch).to(torch.int16)
    batch = {**moe_batch, "routed_experts": routed}
    moved = _moved_dir(small_qwen3_moe_dir, tmp_path / "moved")
    mask = batch["completion_mask"]
    model = load_model(moved)
    with torch.no_grad():
        free = naive_logprobs(model, batch)
        with replay_routing(model, routed):
            replayed = naive_logprobs(model, batch)
    assert float((free - replayed)[mask.bool()].abs().max()) > 1e-4
    old = perturbed_old(replayed, mask)
    ref_loss, ref_norm, before, ref_after = reference_step(
        moved, batch, lambda lp: ref_sapo(lp, old, ADV, mask), weight_decay=0.0, grad_clip=1e9, routed=routed,
        **LINEAR_ADAM)
    learner = make_learner(moved, zero_stage=zero_stage, grad_clip=None, micro_batch_tokens=100, **LINEAR_ADAM)
    take_replay_counts(learner.hf_model)
    m = learner.update(UpdateBatch(batch, ADV, old), Objective("sapo"))
    done, overrode = take_replay_counts(learner.hf_model)
    assert m["micro_batches"] >= 3 and m["skipped"] == 0
    assert 0 < overrode < done
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert_same_update(before, weights(learner), ref_after)


def test_what_the_router_gradient_reaches_under_replay(small_qwen3_moe_dir, moe_batch):
    """Replay layer 0 onto experts {0, 1} only and layer 1 onto {1, 2, 3}: the gradient of the completion logprobs
    reaches exactly the router rows of the replayed experts (the others are exactly 0), and the replayed experts'
    weights. With top_k = 1 the single weight is constant 1 and the routers get no gradient at all."""
    model = load_model(small_qwen3_moe_dir)
    b, t = moe_batch["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    layer1 = torch.stack([torch.randperm(3, generator=g)[:2] + 1 for _ in range(b * t)]).view(b, t, 2)
    routed = torch.stack([torch.tensor([0, 1]).expand(b, t, 2), layer1], dim=2).to(torch.int16)
    logp, _ = token_logprobs(model, {**moe_batch, "routed_experts": routed})
    logp.sum().backward()
    layers = model.model.language_model.layers
    g0, g1 = layers[0].mlp.gate.weight.grad, layers[1].mlp.gate.weight.grad
    assert bool((g0[2:] == 0).all()) and bool((g0[:2].abs().sum(-1) > 0).all())
    assert bool((g1[0] == 0).all()) and bool((g1[1:].abs().sum(-1) > 0).all())
    e0 = layers[0].mlp.experts.gate_up_proj.grad
    assert bool((e0[2:] == 0).all()) and bool((e0[:2].abs().sum((-1, -2)) > 0).all())
    # the replayed weights are the router's own formula: replaying a forward's own choice changes nothing
    with torch.no_grad():
        own = _routing(model, moe_batch)
        free, _ = token_logprobs(model, moe_batch)
        same, _ = token_logprobs(model, {**moe_batch, "routed_experts": own.to(torch.int16)})
    mask = moe_batch["completion_mask"].bool()
    torch.testing.assert_close(same[mask], free[mask], atol=1e-6, rtol=0)

    config = copy.deepcopy(model.config)
    config.text_config.num_experts_per_tok = 1
    top1 = type(model)(config)
    top1_routed = torch.zeros(b, t, 2, 1, dtype=torch.int16)
    logp, _ = token_logprobs(top1, {**moe_batch, "routed_experts": top1_routed})
    logp.sum().backward()
    for layer in top1.model.language_model.layers:
        assert layer.mlp.gate.weight.grad is None or bool((layer.mlp.gate.weight.grad == 0).all())


def test_replay_refuses_dense_models_and_bad_routing(small_qwen3_dir, small_qwen3_moe_dir, moe_batch):
    dense = load_model(small_qwen3_dir)
    with pytest.raises(ValueError, match="needs a mixture-of-experts policy"):
        with replay_routing(dense, torch.zeros(1, 1, 2, 2, dtype=torch.int16)):
            pass
    model = load_model(small_qwen3_moe_dir)
    b, t = moe_batch["input_ids"].shape
    with pytest.raises(ValueError, match=r"needs \[batch, tokens, 2, 2\]"):
        token_logprobs(model, {**moe_batch, "routed_experts": torch.zeros(b, t, 2, 3, dtype=torch.int16)})
    with pytest.raises(ValueError, match="outside -1..3"):
        token_logprobs(model, {**moe_batch, "routed_experts": torch.full((b, t, 2, 2), 4, dtype=torch.int16)})
    with pytest.raises(ValueError, match="aligned with input_ids"):
        token_logprobs(model, {**moe_batch, "routed_experts": torch.zeros(b, t - 1, 2, 2, dtype=torch.int16)})


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_moe_lora_update_and_export_in_the_released_layout(small_qwen3_moe_dir, moe_batch, tmp_path, zero_stage):
    """LoRA on the attention of an MoE policy trains only adapters (experts and routers stay frozen); the export
    writes the experts as the released checkpoints do ([experts, hidden, 2 x inter]), and transformers reloads it
    to the learner's logits."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from vlm_sapo.checkpoint import export_hf

    learner = make_learner(small_qwen3_moe_dir, zero_stage=zero_stage, lr=1e-2,
                           lora=dict(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]), micro_batch_tokens=150)
    for _ in range(2):
        old = learner.compute_logprobs(moe_batch)
        assert learner.update(UpdateBatch(moe_batch, ADV, old), Objective("sapo"))["skipped"] == 0
    base = {n: p.detach() for n, p in load_model(small_qwen3_moe_dir).named_parameters()}
    merged = weights(learner)
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)

    out = export_hf(learner, small_qwen3_moe_dir, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
        assert f.get_slice(name).get_shape() == [4, 32, 48]  # [experts, hidden, 2 x moe_intermediate]
        assert f.get_slice(name.replace("gate_up_proj", "down_proj")).get_shape() == [4, 24, 32]
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(dict(reloaded.named_parameters())[name], merged[name])
    mask = moe_batch["completion_mask"].bool()
    with torch.no_grad():
        got, _ = token_logprobs(reloaded, moe_batch)
    torch.testing.assert_close(got[mask], learner.compute_logprobs(moe_batch)[mask], atol=2e-5, rtol=0)
