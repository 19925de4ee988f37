"""The demo's pieces on a tiny budget: the small-vocabulary tokenizer and model, the cold-start loss (checked against
a plain forward), a few supervised steps, then 2 RL steps of the real trainer from the cold-start checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm_sapo.data import load_samples
from vlm_sapo.demo.synthetic import gold_completion, make_synthetic_data
from vlm_sapo.demo.synthetic.vocab import TAG_TOKENS, build_small_vocab_tiny, train_small_tokenizer

PIXELS = 56 * 56  # the grounding images; the demo's pixel range is [56 * 56, 84 * 84], so none is resized


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    make_synthetic_data(out, seed=0, n_train=24, n_val=6, n_test=6)
    return out


@pytest.fixture(scope="module")
def init_model(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_sapo.demo import split_paths, tokenizer_corpus

    paths = split_paths(demo_data)
    return build_small_vocab_tiny(tmp_path_factory.mktemp("model") / "init", tokenizer_corpus(paths),
                                  vocab_size=320, min_pixels=PIXELS, max_pixels=PIXELS)


def test_small_tokenizer_round_trips_any_text_and_keeps_tags_whole() -> None:
    tok = train_small_tokenizer(["How many red shapes are there?", "<think></think><answer>3</answer>"] * 5,
                                vocab_size=300)
    assert 256 + 14 + 4 <= len(tok) <= 300 + 14 + 4 + 8
    for tag in TAG_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    text = "Ünïcödé 数学 never seen: [12, 40, 28, 56] <answer>7</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(tok.encode(" red", add_special_tokens=False)) == 1  # a frequent word is merged
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    completion = tok.encode("<think></think><answer>3</answer><|im_end|>", add_special_tokens=False)
    assert len(completion) == 6
    assert tok.decode(completion, skip_special_tokens=True) == "<think></think><answer>3</answer>"


def test_cold_start_loss_equals_a_plain_forward(init_model: Path, demo_data: Path) -> None:
    from vlm_sapo.demo.sft import nll_loss, prepare_examples
    from vlm_sapo.models.loading import load_policy, load_processor
    from vlm_sapo.models.logprobs import build_policy_inputs, rope_position_ids

    processor = load_processor(init_model)
    model = load_policy(init_model, dtype="float32")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    samples = [s for f in ("math", "grounding") for s in load_samples(demo_data / f / "train.jsonl", task=f).samples[:2]]
    ex = prepare_examples(processor, samples, family="qwen2_5_vl", min_pixels=PIXELS, max_pixels=PIXELS,
                          completion_for=lambda s: gold_completion(s.task, s.answer))
    assert all(e.prompt.model_input_sizes == [(56, 56)] for e in ex)
    assert all(e.sample.meta["coord_system"] == "abs_resized" for e in ex)
    with torch.no_grad():
        got = nll_loss(model, ex, processor.tokenizer.pad_token_id).item()
        # reference: the transformers forward's full logits, one row at a time, mean NLL over every target token
        total, count = 0.0, 0
        for e in ex:
            inp = build_policy_inputs([e.inputs], [e.target_ids], processor.tokenizer.pad_token_id)
            pos = rope_position_ids(model, inp)
            logits = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                           pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                           mm_token_type_ids=inp["mm_token_type_ids"], position_ids=pos).logits[0].double()
            n = len(e.target_ids)
            logp = torch.log_softmax(logits[-n - 1 : -1], dim=-1)
            total -= logp[torch.arange(n), torch.tensor(e.target_ids)].sum().item()
            count += n
    assert got == pytest.approx(total / count, rel=1e-5)


def test_the_whole_demo_on_a_tiny_budget(tmp_path: Path) -> None:
    """`run_demo` end to end (data, model, cold start, 2 RL steps of the real trainer, the controls, the report), at a
    size that takes seconds: the plumbing, not the learning (README's tables are the learning)."""
    from vlm_sapo.demo import DemoConfig, run_demo
    from vlm_sapo.metrics_log import read_metrics

    cfg = DemoConfig(seed=1, n_train=24, n_val=6, n_test=12, sft_rows=8, sft_steps=6, sft_batch=8, rl_steps=2,
                     vocab_size=320)
    over = ["data.prompts_per_step=3", "rollout.n=4", "rollout.max_new_tokens=12", "algorithm.zero_variance_groups=keep",
            "eval.limit=2", "eval.every_steps=0", "logging.progress=false"]
    result = run_demo(tmp_path, cfg, over)
    rows = read_metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/mismatch_logp_abs_diff_max"] < 1e-4 for r in rows)  # rollout = learner policy
    assert {"val/math/accuracy", "val/chart/accuracy", "val/grounding/accuracy"} <= set(rows[-1])
    for task in ("math", "chart", "grounding"):  # the collapse metrics, in training and validation
        assert 1 <= rows[0][f"answers/{task}/distinct"] <= 4 and 0 < rows[0][f"answers/{task}/top_share"] <= 1
        assert 1 <= rows[-1][f"val/answers/{task}/distinct"] <= 2

    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["seed"] == 1 and 0 < saved["wall_s"] == pytest.approx(result["wall_s"])
    after = [json.loads(line) for line in (tmp_path / "test_after.jsonl").read_text().splitlines()]
    shuffled = [json.loads(line) for line in (tmp_path / "test_after_shuffled.jsonl").read_text().splitlines()]
    assert len(after) == len(shuffled) == 36 and all(0.0 <= d["accuracy"] <= 1.0 for d in after)
    for family, f in saved["families"].items():
        assert set(f) >= {"cold_start", "after", "blind", "shuffled", "top_answer_share_after"}
        mine = [d for d in after if d["task"] == family]
        assert f["after"] == pytest.approx(100 * sum(d["accuracy"] for d in mine) / len(mine))
        assert f["shuffled"] == pytest.approx(100 * sum(d["accuracy"] for d in shuffled if d["task"] == family) / 12)
        answers = [d["completion"] for d in mine]
        assert f["top_answer_share_after"] == pytest.approx(100 * max(map(answers.count, answers)) / 12, abs=1e-6) or \
            family == "grounding"  # grounding counts parsed boxes, which completions may spell differently
    for name in ("summary.md", "reward.png", "accuracy.png", "answers.png", "math_examples.png",
                 "chart_examples.png", "grounding_examples.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name


def test_moe_cold_start(demo_data: Path, tmp_path: Path) -> None:
    """`--family qwen3_vl_moe`: the small-vocabulary builder makes a 4-expert top-2 Qwen3-VL-MoE, the 56-pixel images
    are scaled to 64 so that each grid cell is one 32-pixel image token, and a few supervised steps lower the loss;
    the cold-start checkpoint holds its experts in the released layout (what vLLM loads)."""
    from safetensors import safe_open

    from vlm_sapo.demo import DemoConfig, build_model, cold_start, image_pixels, split_paths
    from vlm_sapo.demo.sft import prepare_examples
    from vlm_sapo.models.loading import load_policy, load_processor

    paths = split_paths(demo_data)
    cfg = DemoConfig(family="qwen3_vl_moe", sft_rows=8, sft_steps=6, sft_batch=8, vocab_size=320)
    pixels = image_pixels(cfg.family)
    assert (pixels, image_pixels()) == ((64 * 64, 96 * 96), (56 * 56, 84 * 84))
    init = build_model(tmp_path / "init", paths, cfg, pixels)
    model = load_policy(init, dtype="float32")
    text = model.config.text_config
    assert (model.config.model_type, text.num_experts, text.num_experts_per_tok) == ("qwen3_vl_moe", 4, 2)
    assert text.vocab_size < 400 and model.config.tie_word_embeddings
    samples = load_samples(demo_data / "grounding" / "train.jsonl", task="grounding").samples[:2]
    ex = prepare_examples(load_processor(init), samples, family=cfg.family, min_pixels=pixels[0], max_pixels=pixels[1],
                          patch_size=16)
    assert all(e.prompt.model_input_sizes == [(64, 64)] for e in ex)
    assert all(int((e.inputs["input_ids"] == model.config.image_token_id).sum()) == 4 for e in ex)
    cold = cold_start(init, tmp_path / "cold", paths, cfg, pixels)
    assert cold["loss_last"] < cold["loss_first"]
    with safe_open(str(tmp_path / "cold" / "model.safetensors"), framework="pt") as f:
        shape = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    assert shape == [4, cfg.hidden_size, 2 * text.moe_intermediate_size]
