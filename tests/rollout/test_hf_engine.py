"""The transformers-generate rollout engine on a tiny random Qwen2.5-VL (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.rollout.rollout_helpers import (
    QWEN3_PIXELS,
    forward_logprobs,
    learner_logprobs,
    max_abs_diff,
    render_test_prompts,
)
from vlm_sapo.data import prompt_model_inputs
from vlm_sapo.rollout import RolloutEngineError, SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine

IM_END, IMAGE_PAD = 151645, 151655


@pytest.fixture(scope="module")
def model(tiny_qwen25_dir):
    from vlm_sapo.models.loading import load_policy

    return load_policy(tiny_qwen25_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def engine(model, tiny25_processor):
    return HFRolloutEngine(model, tiny25_processor)


def with_bias(model, token_bias: dict[int, float]):
    """A copy of the model whose lm_head gets a bias (Qwen's has none): makes chosen tokens likely."""
    biased = copy.deepcopy(model)
    bias = torch.zeros(biased.lm_head.weight.shape[0])
    for token, value in token_bias.items():
        bias[token] = value
    biased.lm_head.bias = torch.nn.Parameter(bias)
    return biased


def test_logprobs_equal_learner_recomputation(engine, model, tiny25_processor, test_prompts):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=10, seed=3)
    ro = engine.generate(test_prompts, 3, sampling)
    assert ro.engine == "hf" and ro.group_size == 3 and ro.num_prompts == 3 and len(ro) == 9
    assert [(c.prompt_index, c.sample_index) for c in ro.completions] == [(p, k) for p in range(3) for k in range(3)]
    for c in ro.completions:
        expected = prompt_model_inputs(tiny25_processor, test_prompts[c.prompt_index])["input_ids"][0].tolist()
        assert c.prompt_ids == expected and c.sample_id == test_prompts[c.prompt_index].id
        assert c.logprobs.dtype == torch.float32 and c.logprobs.shape == (len(c.completion_ids),)
        assert (c.logprobs <= 0).all()
    ours = [c.logprobs for c in ro.completions]
    # The learner's chunked recomputation (top-p/top-k never enter the reported distribution) ...
    assert max_abs_diff(ours, learner_logprobs(model, tiny25_processor, test_prompts, ro, 0.7)) < 1e-4
    # ... and a plain unpadded forward written here.
    ref = [forward_logprobs(model, tiny25_processor, test_prompts[c.prompt_index], c.completion_ids, 0.7)
           for c in ro.completions]
    assert max_abs_diff(ours, ref) < 1e-4
    # Samples within a group differ (a random model at T=0.7 over 151,936 tokens).
    assert len({tuple(c.completion_ids) for c in ro.groups()[0]}) > 1
    assert ro.timing.seconds > 0 and ro.timing.completion_tokens == sum(len(c.completion_ids) for c in ro.completions)
    assert ro.timing.prompt_tokens == sum(len(p) for p in {tuple(c.prompt_ids) for c in ro.completions})
    assert all(0 < c.finish_s <= ro.timing.seconds for c in ro.completions)


def test_stops_at_im_end_and_respects_max_new_tokens(model, tiny25_processor, test_prompts):
    # With +10 on <|im_end|> it has probability ~1/8 per step: some samples stop, some run to max_new_tokens.
    biased = with_bias(model, {IM_END: 10.0})
    engine = HFRolloutEngine(biased, tiny25_processor)
    ro = engine.generate(test_prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=3, seed=0))
    counts = ro.finish_reason_counts()
    assert counts["stop"] > 0 and counts["length"] > 0, counts
    for c in ro.completions:
        assert IM_END not in c.completion_ids[:-1]
        if c.finish_reason == "stop":
            assert c.completion_ids[-1] == IM_END and len(c.completion_ids) <= 3
        else:
            assert len(c.completion_ids) == 3
    ref = learner_logprobs(biased, tiny25_processor, test_prompts, ro, 1.0)
    assert max_abs_diff([c.logprobs for c in ro.completions], ref) < 1e-4


def test_banned_tokens_never_sampled_but_stay_in_the_distribution(model, tiny25_processor, test_prompts):
    # <|image_pad|> gets +25: unbanned, it would be sampled almost every step. The reported logprobs keep its mass.
    biased = with_bias(model, {IMAGE_PAD: 25.0})
    engine = HFRolloutEngine(biased, tiny25_processor)
    assert IMAGE_PAD in engine.banned_ids and 151935 in engine.banned_ids and 151642 not in engine.banned_ids
    ro = engine.generate(test_prompts[:2], 2, SamplingConfig(temperature=1.0, max_new_tokens=4, seed=1))
    assert all(t not in engine.banned_ids for c in ro.completions for t in c.completion_ids)
    ours = [c.logprobs for c in ro.completions]
    assert max(float(x.max()) for x in ours) < -10  # image_pad holds almost all the probability mass
    assert max_abs_diff(ours, learner_logprobs(biased, tiny25_processor, test_prompts[:2], ro, 1.0)) < 1e-4


def test_stop_strings_end_on_the_completing_token(engine, tiny25_processor, test_prompts):
    ro = engine.generate(test_prompts, 3, SamplingConfig(temperature=1.0, max_new_tokens=6, stop=("e",), seed=2))
    tok = tiny25_processor.tokenizer
    assert ro.finish_reason_counts()["stop"] > 0
    for c in ro.completions:
        assert c.text == tok.decode(c.completion_ids, skip_special_tokens=True)
        if c.finish_reason == "stop" and c.completion_ids[-1] != IM_END:
            assert "e" in c.text and "e" not in tok.decode(c.completion_ids[:-1], skip_special_tokens=True)
        if c.finish_reason == "length":
            assert "e" not in c.text and len(c.completion_ids) == 6


def test_greedy_seed_and_checkpoint_generation_config_do_not_leak(engine, model, tiny25_processor, test_prompts):
    greedy = engine.generate(test_prompts[:2], 2, SamplingConfig(temperature=0, max_new_tokens=5))
    for group in greedy.groups():
        assert group[0].completion_ids == group[1].completion_ids
    ref = learner_logprobs(model, tiny25_processor, test_prompts[:2], greedy, 1.0)  # greedy reports T = 1
    assert max_abs_diff([c.logprobs for c in greedy.completions], ref) < 1e-4

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=5, seed=7)
    first = engine.generate(test_prompts[:2], 3, sampling)
    saved = model.generation_config
    try:  # Qwen checkpoints ship sampling defaults; none of them may reach our calls
        model.generation_config = copy.deepcopy(saved)
        model.generation_config.update(top_k=1, temperature=0.05, repetition_penalty=3.0, do_sample=False)
        again = engine.generate(test_prompts[:2], 3, sampling)
    finally:
        model.generation_config = saved
    assert [c.completion_ids for c in again.completions] == [c.completion_ids for c in first.completions]
    assert len({tuple(c.completion_ids) for c in again.groups()[0]}) > 1


def test_batches_of_prompts_give_the_same_structure(model, tiny25_processor, test_prompts):
    engine = HFRolloutEngine(model, tiny25_processor, max_batch_prompts=2)
    ro = engine.generate(test_prompts, 2, SamplingConfig(max_new_tokens=4, seed=0))
    assert [(c.prompt_index, c.sample_id) for c in ro.completions] == [
        (p, test_prompts[p].id) for p in range(3) for _ in range(2)
    ]
    ref = learner_logprobs(model, tiny25_processor, test_prompts, ro, 1.0)
    assert max_abs_diff([c.logprobs for c in ro.completions], ref) < 1e-4


def test_update_weights_copy_and_shared(model, tiny25_processor, test_prompts):
    own = HFRolloutEngine(copy.deepcopy(model), tiny25_processor)
    g = torch.Generator().manual_seed(0)
    new = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    own.update_weights(new.items())
    assert own.weight_version == 1
    for name, p in own.model.named_parameters():
        assert torch.equal(p, new[name]), name
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=0)
    ro = own.generate(test_prompts[:1], 2, sampling)
    assert ro.weight_version == 1
    assert max_abs_diff([c.logprobs for c in ro.completions],
                        learner_logprobs(own.model, tiny25_processor, test_prompts[:1], ro, 1.0)) < 1e-4
    old = learner_logprobs(model, tiny25_processor, test_prompts[:1], ro, 1.0)
    assert max_abs_diff([c.logprobs for c in ro.completions], old) > 1e-2

    shared = HFRolloutEngine(model, tiny25_processor)  # the learner's own module: nothing to copy
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    shared.update_weights(model.named_parameters())
    assert shared.weight_version == 1 and before == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_bad_weight_updates_are_refused(model, tiny25_processor):
    engine = HFRolloutEngine(copy.deepcopy(model), tiny25_processor)
    params = dict(engine.model.named_parameters())
    with pytest.raises(ValueError, match="unknown weight name 'lm_head.weights'"):
        engine.update_weights([("lm_head.weights", params["lm_head.weight"])])
    with pytest.raises(ValueError, match=r"weight 'lm_head.weight' has shape \(3,\)"):
        engine.update_weights([("lm_head.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=f"missing {len(params) - 1} of {len(params)} parameters"):
        engine.update_weights([("lm_head.weight", params["lm_head.weight"])])
    assert engine.weight_version == 0


def test_closed_engine_and_bad_arguments(model, tiny25_processor, test_prompts):
    engine = HFRolloutEngine(model, tiny25_processor)
    with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be >= 1"):
        engine.generate(test_prompts, 0, SamplingConfig())
    engine.sleep()
    engine.wake()
    engine.close()
    with pytest.raises(RolloutEngineError, match="hf engine .* is closed"):
        engine.generate(test_prompts, 1, SamplingConfig())


def test_qwen3_vl_logprobs_equal_learner_recomputation(tiny_qwen3_dir):
    from vlm_sapo.models.loading import load_policy, load_processor

    processor = load_processor(tiny_qwen3_dir)
    model = load_policy(tiny_qwen3_dir, dtype="float32", device="cpu")
    prompts = render_test_prompts(processor, QWEN3_PIXELS)
    ro = HFRolloutEngine(model, processor).generate(prompts, 2, SamplingConfig(temperature=0.9, top_p=0.8,
                                                                                 max_new_tokens=6, seed=0))
    for c in ro.completions:
        p = prompts[c.prompt_index]
        assert c.prompt_ids == prompt_model_inputs(processor, p)["input_ids"][0].tolist()
        assert c.prompt_ids.count(IMAGE_PAD) == sum((w // 32) * (h // 32) for w, h in p.model_input_sizes)
    ref = learner_logprobs(model, processor, prompts, ro, 0.9)
    assert max_abs_diff([c.logprobs for c in ro.completions], ref) < 1e-4
