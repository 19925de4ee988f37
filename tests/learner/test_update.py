"""Learner.update against hand-written references: plain torch AdamW on the whole batch, naive log-softmax, the
losses written out here from their papers' formulas.

Adam's first step is nearly invariant to the gradient's scale (update ~ lr * sign(g)), so a parameter comparison alone
would miss a wrongly scaled loss. Where the tests compare gradients they use eps=1 (for |g| << eps the update is
~ lr * g / eps, linear in g) and also compare the reported gradient norm, which is scale-sensitive.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.learner.learner_batches import load_model, make_batch, make_learner, weights
from vlm_sapo.learner import Objective, UpdateBatch

LINEAR_ADAM = dict(lr=0.5, eps=1.0, betas=(0.9, 0.99))
ADV = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])


def naive_logprobs(model, batch, entropy: bool = False):
    """Full-vocabulary logits in one forward, fp32 log-softmax, shifted: logp[:, t] = log p(ids[t] | ids[:t])."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    logits = model(**{k: batch[k] for k in keys}, use_cache=False).logits.float()
    logp = torch.zeros(batch["input_ids"].shape)
    log_probs = torch.log_softmax(logits[:, :-1], -1)
    logp[:, 1:] = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    if not entropy:
        return logp
    ent = torch.zeros(batch["input_ids"].shape)
    ent[:, 1:] = -(log_probs.exp() * log_probs).sum(-1)
    return logp, ent


def perturbed_old(logp: torch.Tensor, mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A behaviour policy a little off the current one, so ratios, gates and clips are not all trivial."""
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    return (logp.detach() + 0.3 * noise) * mask


def ref_sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """Gao et al. 2025: -(1/G) sum_i (1/|o_i|) sum_t sigmoid(tau (r - 1)) * 4 / tau * A_i."""
    total = 0.0
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        r = torch.exp(logp[i][m] - old[i][m])
        tau = tau_pos if adv[i] > 0 else tau_neg
        total = total + (torch.sigmoid(tau * (r - 1)) * 4 / tau * adv[i]).mean()
    return -total / logp.shape[0]


def ref_clipped(logp, old, adv, mask, lo, hi):
    r = torch.exp(logp - old)
    a = adv[:, None].expand_as(r) if adv.dim() == 1 else adv
    return torch.minimum(r * a, r.clamp(1 - lo, 1 + hi) * a)


def ref_dapo(logp, old, adv, mask):
    """Token mean over the whole batch."""
    m = mask.bool()
    return -ref_clipped(logp, old, adv, mask, 0.2, 0.28)[m].sum() / m.sum()


def ref_drgrpo(logp, old, adv, mask, max_length):
    """Per-sequence token sum / max_length, mean over sequences."""
    m = mask.bool()
    per_tok = torch.where(m, ref_clipped(logp, old, adv, mask, 0.2, 0.2), 0.0)
    return -(per_tok.sum(1) / max_length).mean()


def ref_grpo_seq(logp, old, adv, mask):
    m = mask.bool()
    per_tok = torch.where(m, ref_clipped(logp, old, adv, mask, 0.2, 0.2), 0.0)
    return -(per_tok.sum(1) / m.sum(1)).mean()


def reference_step(model_dir, batch, loss_of_logp, *, lr, eps, betas, weight_decay, grad_clip, routed=None):
    """What the learner must do, without DeepSpeed: whole batch, one AdamW step after clipping (with `routed`, an MoE
    policy's forward and backward replay those experts)."""
    from vlm_sapo.models.routing import replay_routing

    model = load_model(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas)
    with replay_routing(model, routed):
        loss = loss_of_logp(naive_logprobs(model, batch))
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), float(norm), before, after


def assert_same_update(before, after_a, after_b, rel=1e-4):
    """The two parameter changes agree to `rel` of the largest change (norm scales near 1 carry ~1e-7 rounding; a
    wrongly weighted micro-batch or rank shifts changes by percents)."""
    biggest = max(float((after_a[n] - before[n]).abs().max()) for n in before)
    assert biggest > 1e-4, "the update moved nothing"
    worst = max(float(((after_a[n] - before[n]) - (after_b[n] - before[n])).abs().max()) for n in before)
    assert worst <= rel * biggest, f"updates differ by {worst:.3g} (largest change {biggest:.3g})"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_update_matches_hand_written_adamw_step(request, family):
    small_qwen25_dir = request.getfixturevalue({"qwen2_5_vl": "small_qwen25_dir", "qwen3_vl": "small_qwen3_dir",
                                                "qwen3_vl_moe": "small_qwen3_moe_dir"}[family])
    policy_batch = make_batch(small_qwen25_dir)
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        old = perturbed_old(naive_logprobs(load_model(small_qwen25_dir), policy_batch), mask)
    ref_loss, ref_norm, before, ref_after = reference_step(
        small_qwen25_dir, policy_batch, lambda lp: ref_sapo(lp, old, ADV, mask),
        weight_decay=0.1, grad_clip=0.05, **LINEAR_ADAM)
    assert ref_norm > 0.05, "the clip must be active for this test to check it"

    learner = make_learner(small_qwen25_dir, zero_stage=2, weight_decay=0.1, grad_clip=0.05, micro_batch_tokens=100,
                           **LINEAR_ADAM)
    m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    assert m["micro_batches"] >= 3
    assert m["skipped"] == 0 and m["tokens"] == int(mask.sum())
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert m["lr"] == pytest.approx(LINEAR_ADAM["lr"])
    assert_same_update(before, weights(learner), ref_after)


def test_logprobs_and_kl_tis_terms_match_reference(small_qwen25_dir, policy_batch):
    """GRPO + k3 KL + truncated IS, against the formulas; and compute_logprobs against the naive forward."""
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        naive, naive_entropy = naive_logprobs(load_model(small_qwen25_dir), policy_batch, entropy=True)
    old = perturbed_old(naive, mask, seed=1)
    rollout = perturbed_old(naive, mask, seed=2)
    ref_lp = perturbed_old(naive, mask, seed=3)
    cap, kl_coef = 1.5, 0.2
    tis = torch.exp(old - rollout).clamp(max=cap)

    def loss_of(lp):
        adv = ADV[:, None] * tis
        log_rho = ref_lp - lp
        k3 = torch.where(mask.bool(), torch.exp(log_rho) - 1 - log_rho, 0.0)
        kl = (k3.sum(1) / mask.sum(1)).mean()
        return ref_grpo_seq(lp, old, adv, mask) + kl_coef * kl

    ref_loss, ref_norm, before, ref_after = reference_step(
        small_qwen25_dir, policy_batch, loss_of, weight_decay=0.0, grad_clip=1e9, **LINEAR_ADAM)
    learner = make_learner(small_qwen25_dir, zero_stage=2, grad_clip=None, micro_batch_tokens=120, **LINEAR_ADAM)
    logp = learner.compute_logprobs(policy_batch)
    torch.testing.assert_close(logp * mask, naive * mask, atol=2e-5, rtol=0)

    m = learner.update(UpdateBatch(policy_batch, ADV, old, rollout_logp=rollout, ref_logp=ref_lp),
                       Objective("grpo", tis_cap=cap, kl_coef=kl_coef))
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    valid = mask.bool()
    assert m["tis_weight_mean"] == pytest.approx(float(tis[valid].mean()), rel=1e-6)
    assert m["entropy"] == pytest.approx(float(naive_entropy[valid].mean()), rel=1e-5)
    assert m["mismatch_logp_abs_diff_mean"] == pytest.approx(float((old - rollout)[valid].abs().mean()), rel=1e-6)
    assert_same_update(before, weights(learner), ref_after)


@pytest.mark.parametrize("loss_name", ["sapo", "grpo"])
def test_on_policy_update_without_old_logprobs_matches_reference(small_qwen25_dir, policy_batch, loss_name):
    """old_logp=None: pi_old is the current policy (old = detached logp of the same forward), over micro-batches,
    against the formula with old = logp.detach() on a whole-batch naive forward; mismatch metrics against it too."""
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        naive = naive_logprobs(load_model(small_qwen25_dir), policy_batch)
    rollout = perturbed_old(naive, mask, seed=2)
    ref = {"sapo": lambda lp: ref_sapo(lp, lp.detach(), ADV, mask),
           "grpo": lambda lp: ref_grpo_seq(lp, lp.detach(), ADV, mask)}[loss_name]
    ref_loss, ref_norm, before, ref_after = reference_step(
        small_qwen25_dir, policy_batch, ref, weight_decay=0.0, grad_clip=1e9, **LINEAR_ADAM)
    learner = make_learner(small_qwen25_dir, zero_stage=2, grad_clip=None, micro_batch_tokens=100, **LINEAR_ADAM)
    m = learner.update(UpdateBatch(policy_batch, ADV, rollout_logp=rollout), Objective(loss_name))
    assert m["micro_batches"] >= 3 and m["skipped"] == 0
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    valid = mask.bool()
    assert m["mismatch_logp_abs_diff_mean"] == pytest.approx(float((naive - rollout)[valid].abs().mean()), rel=1e-4)
    if loss_name == "sapo":
        assert m["gate_weight_mean"] == pytest.approx(1.0, abs=1e-6)  # r = 1 exactly: w = 4 p (1 - p) = 1
    assert_same_update(before, weights(learner), ref_after)
    with pytest.raises(ValueError, match="tis_cap needs old_logp"):
        learner.update(UpdateBatch(policy_batch, ADV, rollout_logp=rollout), Objective(loss_name, tis_cap=2.0))


@pytest.mark.parametrize(("loss_name", "hparams"), [("sapo", {}), ("dapo", {}), ("drgrpo", {"max_length": 12})])
def test_micro_batch_split_does_not_change_the_update(small_qwen25_dir, policy_batch, loss_name, hparams):
    """One micro-batch vs three of 1, 2 and 2 rows: same loss, gradient norm and parameters (with one row each, a
    plain mean of micro-batch losses would pass for sequence-mean losses by accident)."""
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        old = perturbed_old(naive_logprobs(load_model(small_qwen25_dir), policy_batch), mask)
    runs = []
    for budget in (10**6, 100):
        learner = make_learner(small_qwen25_dir, zero_stage=2, grad_clip=None, micro_batch_tokens=budget,
                               **LINEAR_ADAM)
        before = weights(learner)
        m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective(loss_name, hparams))
        runs.append((m, weights(learner)))
        del learner
    (m_one, w_one), (m_many, w_many) = runs
    assert (m_one["micro_batches"], m_many["micro_batches"]) == (1, 3)
    assert m_many["loss"] == pytest.approx(m_one["loss"], rel=1e-5)
    assert m_many["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-5)
    for key in ("ratio_mean", "clip_frac_high", "gate_weight_mean"):
        if key in m_one:
            assert m_many[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7)
    assert_same_update(before, w_many, w_one)
    # ... and the value is the loss's own aggregation over the whole batch
    with torch.no_grad():
        naive = naive_logprobs(load_model(small_qwen25_dir), policy_batch)
    expected = {"sapo": lambda: ref_sapo(naive, old, ADV, mask), "dapo": lambda: ref_dapo(naive, old, ADV, mask),
                "drgrpo": lambda: ref_drgrpo(naive, old, ADV, mask, 12)}[loss_name]()
    assert m_one["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_sapo_updates_raise_the_logprobs_of_rewarded_tokens(small_qwen25_dir, policy_batch):
    """On-policy the SAPO surrogate is constant (sigmoid(0) * 4 / tau * A = 2 at r = 1, A = 1); the policy must climb."""
    mask = policy_batch["completion_mask"].bool()
    learner = make_learner(small_qwen25_dir, zero_stage=2, lr=3e-3, micro_batch_tokens=150)
    means = []
    for _ in range(10):
        old = learner.compute_logprobs(policy_batch)
        means.append(float(old[mask].mean()))
        m = learner.update(UpdateBatch(policy_batch, torch.ones(5), old), Objective("sapo"))
        assert m["skipped"] == 0 and m["loss"] == pytest.approx(-2.0)
    means.append(float(learner.compute_logprobs(policy_batch)[mask].mean()))
    assert means[-1] - means[0] > 1.0, f"mean log-prob of the rewarded tokens: {means}"
    assert all(b > a for a, b in zip(means, means[1:])), f"not rising at every update: {means}"
    assert learner.updates == 10 and learner.nonfinite_in_a_row == 0


def _optimizer_steps(learner) -> int:
    states = [s for s in learner.optimizer.optimizer.state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def test_nonfinite_loss_skips_the_step_and_counts(small_qwen25_dir, policy_batch):
    mask = policy_batch["completion_mask"]
    learner = make_learner(small_qwen25_dir, zero_stage=2, micro_batch_tokens=150, warmup_steps=4, total_steps=10)
    old = learner.compute_logprobs(policy_batch)
    learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    w0, lr0, sched0, steps0 = weights(learner), learner.lr, learner.scheduler.last_epoch, _optimizer_steps(learner)
    assert steps0 == 1

    bad_adv = ADV[:, None].expand(mask.shape).clone()
    bad_adv[3, mask[3].nonzero()[2, 0]] = float("nan")  # one completion token of one row
    bad_rollout = old.clone()
    bad_rollout[1, mask[1].nonzero()[0, 0]] = float("nan")  # a broken rollout log-prob, through truncated IS
    cases = [(UpdateBatch(policy_batch, bad_adv, old), Objective("sapo")),
             (UpdateBatch(policy_batch, ADV, old, rollout_logp=bad_rollout), Objective("sapo", tis_cap=2.0))]
    for i, (batch, objective) in enumerate(cases):
        m = learner.update(batch, objective)
        assert m["skipped"] == 1 and m["nonfinite_in_a_row"] == i + 1 == learner.nonfinite_in_a_row
        assert not math.isfinite(m["grad_norm"]) or not math.isfinite(m["loss"])
        assert all(torch.equal(w0[n], t) for n, t in weights(learner).items()), "a skipped step changed weights"
        assert (learner.lr, learner.scheduler.last_epoch, _optimizer_steps(learner)) == (lr0, sched0, steps0)

    m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    assert m["skipped"] == 0 and learner.nonfinite_in_a_row == 0
    assert m["lr"] == pytest.approx(lr0) and learner.lr > lr0  # the warm-up resumed where it stood
    assert not all(torch.equal(w0[n], t) for n, t in weights(learner).items())


def test_frozen_vision_tower_stays_unchanged(small_qwen25_dir, policy_batch):
    learner = make_learner(small_qwen25_dir, zero_stage=2, freeze_vision_tower=True, micro_batch_tokens=150,
                           gradient_checkpointing=True)
    before = weights(learner)
    old = learner.compute_logprobs(policy_batch)
    for _ in range(2):
        assert learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))["skipped"] == 0
    after = weights(learner)
    vision = [n for n in before if n.startswith("model.visual.")]
    text = [n for n in before if n not in vision]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert sum(not torch.equal(before[n], after[n]) for n in text) > len(text) // 2
    trainable = {n for n, p in learner.policy.named_parameters() if p.requires_grad}
    assert trainable == set(text) - {"lm_head.weight"} | ({"lm_head.weight"} & trainable)


def test_zero3_matches_zero2(small_qwen25_dir, policy_batch):
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        old = perturbed_old(naive_logprobs(load_model(small_qwen25_dir), policy_batch), mask)
    results = {}
    for stage in (2, 3):
        learner = make_learner(small_qwen25_dir, zero_stage=stage, grad_clip=0.05, micro_batch_tokens=100,
                               **LINEAR_ADAM)
        before = weights(learner)
        m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("dapo"))
        results[stage] = (m, weights(learner))
    (m2, w2), (m3, w3) = results[2], results[3]
    assert {n: t.shape for n, t in w3.items()} == {n: t.shape for n, t in before.items()}
    assert m3["micro_batches"] == m2["micro_batches"] >= 3
    assert m3["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    assert m3["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    assert m3["entropy"] == pytest.approx(m2["entropy"], rel=1e-5)
    assert_same_update(before, w3, w2)


def test_bad_inputs_name_the_problem(small_qwen25_dir, policy_batch):
    learner = make_learner(small_qwen25_dir, zero_stage=2)
    old = torch.zeros(policy_batch["input_ids"].shape)
    with pytest.raises(ValueError, match="old_logp has shape"):
        learner.update(UpdateBatch(policy_batch, ADV, old[:, :-1]), Objective("sapo"))
    with pytest.raises(ValueError, match="advantages has 4 rows"):
        learner.update(UpdateBatch(policy_batch, ADV[:4], old), Objective("sapo"))
    with pytest.raises(ValueError, match="unknown policy loss"):
        learner.update(UpdateBatch(policy_batch, ADV, old), Objective("ppo2"))
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo", kl_coef=0.1))
    # a row without completion tokens scores nothing and is left out of the micro-batches
    partial_mask = policy_batch["completion_mask"].clone()
    partial_mask[2] = 0
    partial = {**policy_batch, "completion_mask": partial_mask}
    full, part = learner.compute_logprobs(policy_batch), learner.compute_logprobs(partial)
    assert torch.equal(part[2], torch.zeros_like(part[2]))
    torch.testing.assert_close(part * partial_mask, full * partial_mask, atol=1e-6, rtol=0)
    assert learner.update(UpdateBatch(partial, ADV, part), Objective("sapo"))["tokens"] == int(partial_mask.sum())
    empty = {**policy_batch, "completion_mask": torch.zeros_like(policy_batch["completion_mask"])}
    with pytest.raises(ValueError, match="no completion token"):
        learner.update(UpdateBatch(empty, ADV, old), Objective("sapo"))
    with pytest.raises(ValueError, match="zero_stage must be 1, 2 or 3"):
        make_learner(small_qwen25_dir, zero_stage=0)


def test_bf16_updates_and_guards_like_fp32(small_qwen25_dir, policy_batch):
    """bf16 (the GPU setting; DeepSpeed runs it on CPU too): fp32 master weights, same loss to bf16 precision, and a
    non-finite gradient still skips the step (DeepSpeed's bf16 overflow check is switched on by the learner)."""
    mask = policy_batch["completion_mask"]
    with torch.no_grad():
        old = perturbed_old(naive_logprobs(load_model(small_qwen25_dir), policy_batch), mask)
    learner = make_learner(small_qwen25_dir, zero_stage=2, bf16=True, micro_batch_tokens=150)
    assert next(learner.policy.parameters()).dtype == torch.bfloat16
    m = learner.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))
    with torch.no_grad():
        ref = float(ref_sapo(naive_logprobs(load_model(small_qwen25_dir), policy_batch), old, ADV, mask))
    assert m["skipped"] == 0 and m["loss"] == pytest.approx(ref, rel=2e-2)
    before = weights(learner)
    bad = ADV.clone()
    bad[0] = float("inf")
    assert learner.update(UpdateBatch(policy_batch, bad, old), Objective("sapo"))["skipped"] == 1
    assert all(torch.equal(before[n], t) for n, t in weights(learner).items())


def test_a_new_learner_after_the_process_group_was_destroyed_elsewhere(small_qwen25_dir, policy_batch):
    # vLLM's engine shutdown destroys torch's default group directly (not through DeepSpeed): a learner made after
    # it must get a working group, not DeepSpeed's stale clone of the old one ("Group ... is not registered").
    first = make_learner(small_qwen25_dir, zero_stage=2)
    reference = first.compute_logprobs(policy_batch)
    del first
    torch.distributed.destroy_process_group()
    second = make_learner(small_qwen25_dir, zero_stage=2)
    assert torch.distributed.is_initialized()
    old = second.compute_logprobs(policy_batch)
    assert torch.allclose(old, reference, atol=1e-6)  # the same weights score the same
    assert second.update(UpdateBatch(policy_batch, ADV, old), Objective("sapo"))["skipped"] == 0
    assert not torch.allclose(second.compute_logprobs(policy_batch), old)  # and the update went through
