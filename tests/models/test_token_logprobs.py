"""Chunked logprob recomputation equals the naive full-logits computation, and equals what generate() sampled from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_sapo.models.logprobs import build_policy_inputs, chunked_logprobs, token_logprobs
from vlm_sapo.models.tokenizer import non_text_token_ids

EOS, PAD = 151645, 151643


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def tiny(request):
    path = request.getfixturevalue({"qwen2_5_vl": "tiny_qwen25_dir", "qwen3_vl": "tiny_qwen3_dir",
                                    "qwen3_vl_moe": "tiny_qwen3_moe_dir"}[request.param])
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _prompts(processor):
    """Three prompts with different image sizes (so different grids and mRoPE offsets) and question lengths."""
    specs = [((70, 120), "What is this?"), ((100, 60), "How many circles are red?"), ((56, 56), "Answer: A, B or C")]
    texts = [_prompt(processor, q) for _, q in specs]
    images = [_image(h, w, seed=i) for i, ((h, w), _) in enumerate(specs)]
    return texts, images


def _naive(model, inputs, temperature=1.0):
    """Reference: the model's own forward (its own position ids), full fp32 logits, log_softmax, gather."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    logits = model(**{k: inputs[k] for k in keys}).logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum(-1)
    ids = inputs["input_ids"]
    logp = torch.zeros(ids.shape)
    logp[:, 1:] = logp_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = torch.zeros(ids.shape)
    ent[:, 1:] = entropy[:, :-1]
    return logp, ent


def _ragged_batch(processor, lengths=(7, 2, 11), seed=0):
    texts, images = _prompts(processor)
    prompts = [processor(text=[t], images=[im], return_tensors="pt") for t, im in zip(texts, images)]
    g = torch.Generator().manual_seed(seed)
    completions = [torch.randint(0, 151643, (n,), generator=g).tolist() for n in lengths]
    return build_policy_inputs(prompts, completions, PAD), completions


def _scored(inputs, completion_mask):
    mask = (inputs["attention_mask"] if completion_mask is None else completion_mask).bool()
    out = mask.clone()
    out[:, 0] = False
    out[:, 1:] &= inputs["attention_mask"][:, :-1].bool()
    return out


@pytest.mark.parametrize("use_completion_mask", [True, False])
def test_values_equal_naive(tiny, use_completion_mask):
    model, processor = tiny
    inputs, _ = _ragged_batch(processor)
    if use_completion_mask:
        mask = inputs["completion_mask"]
    else:  # drop the key so every real token is scored
        mask, inputs = None, {k: v for k, v in inputs.items() if k != "completion_mask"}
    with torch.no_grad():
        ref_logp, ref_ent = _naive(model, inputs)
        # Chunks of 5 (completion tokens) or 16 (all tokens) leave a ragged last chunk either way.
        chunk = 5 if use_completion_mask else 16
        logp, ent = token_logprobs(model, inputs, chunk_size=chunk, return_entropy=True, completion_mask=mask)
        if use_completion_mask:  # the ZeRO-3 path, through the lm_head module
            logp_ckpt, ent_ckpt = token_logprobs(model, inputs, chunk_size=6, return_entropy=True, impl="checkpoint")
    scored = _scored(inputs, mask)
    if use_completion_mask:
        assert torch.equal(scored, mask.bool())
    else:
        assert torch.equal(scored[:, 1:], inputs["attention_mask"][:, 1:].bool()) and not scored[:, 0].any()
    assert scored.sum() >= 20
    assert logp.dtype == torch.float32 and logp.shape == inputs["input_ids"].shape
    torch.testing.assert_close(logp[scored], ref_logp[scored], atol=1e-5, rtol=0)
    # Entropy sums 151,936 fp32 terms (~11.9 nats): allow summation-order noise relative to its size.
    torch.testing.assert_close(ent[scored], ref_ent[scored], atol=1e-5, rtol=1e-5)
    assert torch.all(logp[~scored] == 0) and torch.all(ent[~scored] == 0)
    if use_completion_mask:
        torch.testing.assert_close(logp_ckpt, logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent_ckpt, ent, atol=1e-5, rtol=1e-5)
    # Random tiny weights give near-uniform predictions: logprobs sit near -log(151936) but are not all equal.
    assert ref_logp[scored].std() > 1e-3


def test_completion_mask_key_is_used_and_temperature(tiny):
    model, processor = tiny
    inputs, completions = _ragged_batch(processor, lengths=(4, 9, 1), seed=1)
    with torch.no_grad():
        logp, _ = token_logprobs(model, inputs, temperature=0.7, chunk_size=4)
        ref, _ = _naive(model, inputs, temperature=0.7)
    scored = inputs["completion_mask"].bool()
    assert int(scored.sum()) == sum(len(c) for c in completions)
    torch.testing.assert_close(logp[scored], ref[scored], atol=1e-5, rtol=0)
    assert torch.all(logp[~scored] == 0)


def test_gradients_equal_naive(tiny):
    model, processor = tiny
    inputs, _ = _ragged_batch(processor, lengths=(6, 3, 8), seed=2)
    scored = inputs["completion_mask"].bool()
    weights = torch.randn(inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    model.zero_grad()
    ref, _ = _naive(model, inputs, temperature=0.9)
    (ref * weights * scored).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in named}
    # Vision tower, text layers and head all get a gradient.
    assert any(g.abs().sum() > 0 for n, g in ref_grads.items() if n.startswith("model.visual"))
    assert ref_grads["lm_head.weight"].abs().sum() > 0

    # The checkpoint path does not depend on the family: check it once. The fused path keeps the probabilities for
    # the backward (default budget) or recomputes them (budget 0).
    impls = [("fused", None), ("fused", 0)] + [("checkpoint", None)] * (model.config.model_type == "qwen2_5_vl")
    for impl, keep in impls:
        model.zero_grad()
        extra = {} if keep is None else {"keep_probs_bytes": keep}
        logp, _ = token_logprobs(model, inputs, temperature=0.9, chunk_size=4, impl=impl, **extra)
        assert logp.requires_grad
        (logp * weights).sum().backward()
        for name, p in named:
            assert p.grad is not None, f"{impl}: {name} got no gradient"
            # fp32 summation-order noise scales with the tensor's largest entry (about 1e-6 of it here).
            scale = float(ref_grads[name].abs().max())
            err = float((p.grad - ref_grads[name]).abs().max())
            assert err <= 1e-5 * scale + 1e-9, f"{impl}: {name} gradient differs by {err:.2e} (largest {scale:.2e})"
    model.zero_grad()


def test_left_padding_equals_right_padding(tiny):
    model, processor = tiny
    inputs, _ = _ragged_batch(processor, lengths=(5, 2, 6), seed=3)
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    lengths = attn.sum(1)
    width = ids.shape[1]
    left = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "completion_mask"):
        t = torch.full_like(inputs[key], PAD if key == "input_ids" else 0)
        for b, n in enumerate(lengths.tolist()):
            t[b, width - n :] = inputs[key][b, :n]
        left[key] = t
    with torch.no_grad():
        right_logp, _ = token_logprobs(model, inputs, chunk_size=8)
        left_logp, _ = token_logprobs(model, left, chunk_size=8)
        ref_left, _ = _naive(model, left)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(left_logp[b, width - n :], right_logp[b, :n], atol=1e-5, rtol=0)
    scored = left["completion_mask"].bool()
    torch.testing.assert_close(left_logp[scored], ref_left[scored], atol=1e-5, rtol=0)


def test_generate_logprobs_equal_recomputed(tiny):
    """The key invariant: what HF generate sampled from (left-padded batch, KV cache, its own mRoPE deltas) equals
    the learner's recomputation over right-padded prompt + completion, so the mRoPE ids are rebuilt right."""
    model, processor = tiny
    texts, images = _prompts(processor)
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    vocab = model.config.text_config.vocab_size
    banned = non_text_token_ids(processor.tokenizer, vocab, keep=(EOS,))  # a random model samples them otherwise
    assert banned == [i for i in range(PAD, vocab) if i != EOS]
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=10,
        bad_words_ids=[[i] for i in banned],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    gen_logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, new[..., None]).squeeze(-1)
    completions = []
    for row in new.tolist():
        completions.append(row[: row.index(EOS) + 1] if EOS in row else row)

    singles = [processor(text=[t], images=[im], return_tensors="pt") for t, im in zip(texts, images)]
    inputs = build_policy_inputs(singles, completions, PAD)
    with torch.no_grad():
        logp, _ = token_logprobs(model, inputs, chunk_size=7)
        # Without mm_token_type_ids the model falls back to wrong (1-D or absent) positions: the check is sensitive.
        if model.config.model_type == "qwen2_5_vl":
            keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            wrong = torch.log_softmax(model(**{k: inputs[k] for k in keys}).logits.float(), -1)
    for b, comp in enumerate(completions):
        start = int(inputs["prompt_lengths"][b])
        diff = (logp[b, start : start + len(comp)] - gen_logp[b, : len(comp)]).abs().max()
        assert diff < 1e-4, f"row {b}: recomputed logprobs differ from generate's by {diff:.2e}"
        if model.config.model_type == "qwen2_5_vl":
            targets = inputs["input_ids"][b, start : start + len(comp)]
            wrong_b = wrong[b, start - 1 : start - 1 + len(comp)].gather(-1, targets[:, None]).squeeze(-1)
            assert (wrong_b - gen_logp[b, : len(comp)]).abs().max() > 1e-4


def test_build_policy_inputs_layout(tiny):
    model, processor = tiny
    texts, images = _prompts(processor)
    singles = [processor(text=[t], images=[im], return_tensors="pt") for t, im in zip(texts, images)]
    completions = [[11, 12, 13], [14], [15, 16]]
    out = build_policy_inputs(singles, completions, PAD)
    lens = [s["input_ids"].shape[1] for s in singles]
    assert out["input_ids"].shape == (3, max(n + len(c) for n, c in zip(lens, completions)))
    for b, (n, c) in enumerate(zip(lens, completions)):
        total = n + len(c)
        assert out["input_ids"][b, :n].tolist() == singles[b]["input_ids"][0].tolist()
        assert out["input_ids"][b, n:total].tolist() == c
        assert torch.all(out["input_ids"][b, total:] == PAD)
        assert out["attention_mask"][b].tolist() == [1] * total + [0] * (out["input_ids"].shape[1] - total)
        assert out["completion_mask"][b, n:total].tolist() == [1] * len(c)
        assert out["completion_mask"][b].sum() == len(c)
        assert out["mm_token_type_ids"][b, :n].tolist() == singles[b]["mm_token_type_ids"][0].tolist()
        assert torch.all(out["mm_token_type_ids"][b, n:] == 0)
    assert out["prompt_lengths"].tolist() == lens
    torch.testing.assert_close(out["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    torch.testing.assert_close(out["image_grid_thw"], torch.cat([s["image_grid_thw"] for s in singles]))

    # A batched, left-padded processor output gives the same rows.
    processor.tokenizer.padding_side = "left"
    batched = processor(text=texts, images=images, return_tensors="pt", padding=True)
    out2 = build_policy_inputs(batched, completions, PAD)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "completion_mask", "pixel_values"):
        torch.testing.assert_close(out2[key], out[key], msg=key)

    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        build_policy_inputs(singles, completions[:2], PAD)
    with pytest.raises(KeyError, match="prompt_inputs\\[1\\] has no input_ids"):
        build_policy_inputs([singles[0], {"pixel_values": 1}], completions[:2], PAD)


def test_bad_arguments(tiny):
    model, processor = tiny
    inputs, _ = _ragged_batch(processor, lengths=(1, 1, 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(model, inputs, temperature=0)
    with pytest.raises(KeyError, match="attention_mask"):
        token_logprobs(model, {"input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match="completion_mask has shape"):
        token_logprobs(model, inputs, completion_mask=inputs["completion_mask"][:, :-1])


@pytest.mark.parametrize("keep_probs_bytes", [0, 1 << 30])
@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, 1024), (0.7, 5)])
def test_chunked_logprobs_values_and_gradients_equal_naive(keep_probs_bytes, temperature, chunk_size):
    """The fused kernel alone against log_softmax of the full logits: values, entropy and both gradients to 1e-5,
    with the probabilities kept from forward to backward or recomputed, and a second backward (retain_graph)."""
    g = torch.Generator().manual_seed(0)
    n, hid, vocab = 23, 16, 3001
    hidden = (torch.randn(n, hid, generator=g)).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g)

    logits = (hidden @ weight.t()).double() / temperature
    ref_all = torch.log_softmax(logits, -1)
    ref = ref_all.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))

    logp, ent = chunked_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                 return_entropy=True, keep_probs_bytes=keep_probs_bytes)
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    for _ in range(2):  # the kept probabilities are consumed by the first backward; the second recomputes
        gh, gw = torch.autograd.grad((logp * upstream).sum(), (hidden, weight), retain_graph=True)
        torch.testing.assert_close(gh, rh, rtol=0, atol=1e-5)
        torch.testing.assert_close(gw, rw, rtol=0, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: nothing kept, same values
        again, _ = chunked_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                    keep_probs_bytes=keep_probs_bytes)
    torch.testing.assert_close(again, logp.detach(), rtol=0, atol=1e-6)
