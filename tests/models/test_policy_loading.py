"""load_policy / load_processor: the right model and dtype, pixel budgets applied, clear and fast errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from vlm_sapo.models.loading import load_policy, load_processor, model_family


def test_load_policy_tiny_qwen25(tiny_qwen25_dir):
    model = load_policy(tiny_qwen25_dir, gradient_checkpointing=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.float32  # "auto" on CPU
    assert model.device.type == "cpu"
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    assert model.config._attn_implementation == "sdpa"
    bf16 = load_policy(tiny_qwen25_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and not bf16.is_gradient_checkpointing
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_policy(tiny_qwen25_dir, dtype="fp8")


def test_model_family(tiny_qwen25_dir, tiny_qwen3_dir):
    assert model_family(AutoConfig.from_pretrained(tiny_qwen25_dir)) == "qwen2_5_vl"
    assert model_family(AutoConfig.from_pretrained(tiny_qwen3_dir)) == "qwen3_vl"
    assert model_family("qwen2_vl") == "qwen2_vl"
    with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
        model_family("llava")


def test_unsupported_model_type_is_named(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2, "vocab_size": 64}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_policy(folder)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor(tmp_path / "nope")


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_policy("Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(FileNotFoundError, match="'Qwen/Qwen3-VL-2B-Instruct' is neither a local folder"):
        load_processor("Qwen/Qwen3-VL-2B-Instruct")
    assert time.monotonic() - start < 5


def test_load_processor_pixel_budget(tiny_qwen3_dir):
    image = Image.fromarray(np.zeros((480, 640, 3), dtype=np.uint8))
    text = ["<|vision_start|><|image_pad|><|vision_end|>"]
    default = load_processor(tiny_qwen3_dir)
    small = load_processor(tiny_qwen3_dir, max_pixels=16 * 32 * 32)
    grid_default = default(text=text, images=[image], return_tensors="pt")["image_grid_thw"][0]
    out = small(text=text, images=[image], return_tensors="pt")
    grid_small = out["image_grid_thw"][0]
    patch = 16
    # smart_resize keeps h*w <= max_pixels in multiples of patch*merge = 32.
    assert int(grid_small[1] * grid_small[2]) * patch * patch <= 16 * 32 * 32
    assert int(grid_small.prod()) < int(grid_default.prod())
    assert int((out["input_ids"][0] == 151655).sum()) == int(grid_small.prod()) // 4
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        load_processor(tiny_qwen3_dir, min_pixels=10_000, max_pixels=5_000)
