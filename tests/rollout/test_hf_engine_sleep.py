"""The hf engine's sleep/wake contract and its processor-free entry point (used by scripts/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from vlm_sapo.data import prompt_model_inputs
from vlm_sapo.rollout import RolloutEngineError, SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine


def test_asleep_engine_refuses_work_until_woken_and_inputs_path_equals_generate(tiny_qwen25_dir, tiny25_processor,
                                                                                  test_prompts):
    engine = HFRolloutEngine.from_pretrained(tiny_qwen25_dir, tiny25_processor, dtype="float32")
    assert engine.owns_model  # its own copy: on CUDA, sleep would move it to CPU memory
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=3)
    engine.sleep()
    with pytest.raises(RolloutEngineError, match="asleep"):
        engine.generate(test_prompts[:1], 2, sampling)
    with pytest.raises(RolloutEngineError, match="asleep"):
        engine.update_weights(engine.model.named_parameters())
    assert next(engine.model.parameters()).device.type == "cpu"  # on CPU nothing moves
    engine.wake()
    ro = engine.generate(test_prompts[:2], 2, sampling)
    inputs = [prompt_model_inputs(tiny25_processor, p) for p in test_prompts[:2]]
    again = engine.generate_from_inputs(inputs, [p.id for p in test_prompts[:2]], 2, sampling)
    assert [c.completion_ids for c in again.completions] == [c.completion_ids for c in ro.completions]
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(again.completions, ro.completions))
    assert [c.sample_id for c in again.completions] == [p.id for p in test_prompts[:2] for _ in range(2)]
    assert [c.sample_id for c in ro.completions] == [p.id for p in test_prompts[:2] for _ in range(2)]
    engine.close()
