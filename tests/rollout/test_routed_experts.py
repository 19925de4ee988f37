"""Routing replay R3 on a tiny Qwen3-VL-MoE (4 experts, top-2): the transformers engine records the experts its router
chose during generate, and the learner's forward that replays them scores exactly what was sampled.

References: a plain transformers forward over prompt + completion (`forward_logprobs`), and the learner forward's own
routing recorded from the same router; the perturbed-router case shows what replay changes and what it cannot.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.rollout.rollout_helpers import QWEN3_PIXELS, forward_logprobs, max_abs_diff, render_test_prompts
from vlm_sapo.data import prompt_model_inputs
from vlm_sapo.models.logprobs import build_policy_inputs, token_logprobs
from vlm_sapo.models.routing import record_routing, routed_experts_batch
from vlm_sapo.rollout import SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine

T = 0.9


@pytest.fixture(scope="module")
def moe(tiny_qwen3_moe_dir):
    from vlm_sapo.models.loading import load_policy, load_processor

    processor = load_processor(tiny_qwen3_moe_dir)
    return load_policy(tiny_qwen3_moe_dir, dtype="float32", device="cpu").eval(), processor


@pytest.fixture(scope="module")
def rollouts(moe):
    model, processor = moe
    prompts = render_test_prompts(processor, QWEN3_PIXELS)
    engine = HFRolloutEngine(model, processor, return_routed_experts=True)
    return prompts, engine.generate(prompts, 2, SamplingConfig(temperature=T, max_new_tokens=6, seed=0))


def _score(model, processor, prompts, ro, replay: bool):
    """The learner's recomputation over a right-padded batch, with or without the rollout's experts; also the experts
    its forward actually used ([B, T, layers, k]) and the batch's replayed ones."""
    comps = ro.completions
    per_prompt = [prompt_model_inputs(processor, p) for p in prompts]
    batch = build_policy_inputs([per_prompt[c.prompt_index] for c in comps], [c.completion_ids for c in comps],
                                processor.tokenizer.pad_token_id)
    routed = routed_experts_batch([c.routed_experts for c in comps], batch["input_ids"].shape[1])
    inputs = {**batch, "routed_experts": routed} if replay else batch
    with torch.no_grad(), record_routing(model) as rec:
        logp, _ = token_logprobs(model, inputs, temperature=T)
    used = rec.calls[0].view(*batch["input_ids"].shape, *routed.shape[2:])
    rows = [logp[b, len(c.prompt_ids): len(c.prompt_ids) + len(c.completion_ids)] for b, c in enumerate(comps)]
    return rows, used, routed


def _same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (token, layer): the same set of k experts (the order within the top-k does not matter)."""
    return (a.long().sort(-1).values == b.long().sort(-1).values).all(-1)


def test_recorded_routing_covers_every_fed_token(moe, rollouts):
    model, _ = moe
    prompts, ro = rollouts
    for c in ro.completions:
        r = c.routed_experts
        assert r.dtype == torch.uint8 and r.shape == (len(c.prompt_ids) + len(c.completion_ids) - 1, 2, 2)
        assert int(r.max()) < 4 and bool((r[..., 0] != r[..., 1]).all())  # two distinct experts of four per token
    # prompts of different lengths (left padding inside generate) still start at their own first token
    assert len({len(c.prompt_ids) for c in ro.completions}) == 3


def test_r3_learner_logprobs_equal_the_rollouts(moe, rollouts):
    model, processor = moe
    prompts, ro = rollouts
    ours = [c.logprobs for c in ro.completions]
    replayed, used, routed = _score(model, processor, prompts, ro, replay=True)
    free, used_free, _ = _score(model, processor, prompts, ro, replay=False)
    fed = routed[..., 0, 0] >= 0
    # on the rollout's own weights the router chooses as the engine did, and the replayed pass scores alike
    assert bool(_same_experts(used_free, routed)[fed].all())
    assert bool(_same_experts(used, routed)[fed].all())
    assert max_abs_diff(ours, replayed) < 1e-5
    assert max_abs_diff(replayed, free) < 1e-5
    ref = [forward_logprobs(model, processor, prompts[c.prompt_index], c.completion_ids, T) for c in ro.completions]
    assert max_abs_diff(ours, ref) < 1e-5


def test_r3_after_the_router_moved(moe, rollouts):
    """A small change of the routers' weights flips some tokens' experts: without replay the learner then routes
    (and scores) differently from the rollout; with replay every token uses exactly the rollout's experts, and what
    remains of the difference is the new router's mixing weights of those experts."""
    model, processor = moe
    prompts, ro = rollouts
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    ours = [c.logprobs for c in ro.completions]
    free, used_free, routed = _score(moved, processor, prompts, ro, replay=False)
    replayed, used, _ = _score(moved, processor, prompts, ro, replay=True)
    fed = routed[..., 0, 0] >= 0
    flipped = 1 - float(_same_experts(used_free, routed)[fed].float().mean())
    assert 0.02 < flipped < 0.5, flipped
    assert bool(_same_experts(used, routed)[fed].all())
    assert max_abs_diff(ours, free) > 1e-3
    assert max_abs_diff(ours, replayed) < max_abs_diff(ours, free)


def test_dense_models_are_refused(tiny_qwen3_dir):
    from vlm_sapo.models.loading import load_policy, load_processor

    model = load_policy(tiny_qwen3_dir, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="needs a mixture-of-experts policy"):
        HFRolloutEngine(model, load_processor(tiny_qwen3_dir), return_routed_experts=True)
