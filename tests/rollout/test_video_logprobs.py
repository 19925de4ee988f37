"""Video prompts on the tiny Qwen2.5-VL and Qwen3-VL: the same prompt tokens (video tokens, Qwen3-VL's timestamps)
in the rollout engines as in the learner's processor call, and per-token logprobs equal to the learner's
recomputation (`token_logprobs`, its own mRoPE positions) and to a plain forward of the model. A batch mixes
video-only, odd frame counts (padded), an image plus a video, and an image-only prompt.

The transformers engine is checked here for both families and vLLM for Qwen3-VL (its own engine, with a weight
update); vLLM on Qwen2.5-VL is in `test_vllm_engine.py`, on that module's engine. Run with `-s` to see the max |diff|
figures (README, "Video").
"""

from __future__ import annotations

import pytest
import torch

from tests.rollout.rollout_helpers import (
    QWEN3_PIXELS,
    QWEN25_PIXELS,
    check_video_prompt_tokens,
    forward_logprobs,
    learner_logprobs,
    max_abs_diff,
    render_video_prompts,
    video_processor_for,
)
from vlm_sapo.rollout import SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine

FAMILIES = {"qwen2_5_vl": ("tiny_qwen25_dir", QWEN25_PIXELS), "qwen3_vl": ("tiny_qwen3_dir", QWEN3_PIXELS)}
SAMPLING = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=4)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    from vlm_sapo.models.loading import load_policy

    fixture, pixels = FAMILIES[request.param]
    path = request.getfixturevalue(fixture)
    processor = video_processor_for(path, pixels)
    model = load_policy(path, dtype="float32", device="cpu")
    return request.param, path, processor, model, render_video_prompts(processor, pixels)


def test_hf_engine_video_logprobs_equal_the_learner(family) -> None:
    name, _, processor, model, prompts = family
    ro = HFRolloutEngine(model, processor).generate(prompts, 2, SAMPLING)
    check_video_prompt_tokens(processor, prompts, ro)
    ours = [c.logprobs for c in ro.completions]
    learner = max_abs_diff(ours, learner_logprobs(model, processor, prompts, ro, 0.8))
    forward = max_abs_diff(ours, [forward_logprobs(model, processor, prompts[c.prompt_index], c.completion_ids, 0.8)
                                  for c in ro.completions])
    print(f"\n{name} hf engine, video prompts: max |diff| vs learner {learner:.1e}, vs forward {forward:.1e}")
    assert learner < 1e-4 and forward < 1e-4


@pytest.mark.vllm
def test_vllm_qwen3_video_logprobs_equal_the_learner_and_survive_a_weight_update(tiny_qwen3_dir) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    from vlm_sapo.models.loading import load_policy
    from vlm_sapo.rollout.vllm_engine import VLLMRolloutEngine

    processor = video_processor_for(tiny_qwen3_dir, QWEN3_PIXELS)
    model = load_policy(tiny_qwen3_dir, dtype="float32", device="cpu")
    prompts = render_video_prompts(processor, QWEN3_PIXELS)
    engine = VLLMRolloutEngine(tiny_qwen3_dir, processor, max_model_len=512, kv_cache_gib=1, max_videos_per_prompt=1)
    try:
        ro = engine.generate(prompts, 2, SAMPLING)
        check_video_prompt_tokens(processor, prompts, ro)
        ours = [c.logprobs for c in ro.completions]
        learner = max_abs_diff(ours, learner_logprobs(model, processor, prompts, ro, 0.8))
        print(f"\nqwen3_vl vllm engine, video prompts: max |diff| vs learner {learner:.1e}")
        assert learner < 1e-4

        new_model = load_policy(tiny_qwen3_dir, dtype="float32", device="cpu")
        with torch.no_grad():
            new_model.model.visual.patch_embed.proj.weight.mul_(1.5)
            new_model.lm_head.weight.add_(0.05 * torch.randn_like(new_model.lm_head.weight))
        engine.update_weights(new_model.named_parameters())
        after = engine.generate(prompts[:3], 2, SAMPLING)  # the same videos: the encoder cache must have been reset
        ours = [c.logprobs for c in after.completions]
        synced = max_abs_diff(ours, learner_logprobs(new_model, processor, prompts[:3], after, 0.8))
        stale = max_abs_diff(ours, learner_logprobs(model, processor, prompts[:3], after, 0.8))
        print(f"qwen3_vl vllm engine after a weight update: max |diff| vs new weights {synced:.1e}, old {stale:.1e}")
        assert synced < 1e-4 and stale > 1e-2
    finally:
        engine.close()
