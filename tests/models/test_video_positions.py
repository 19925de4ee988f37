"""mRoPE positions after a video (the released Qwen2-VL / Qwen2.5-VL rule, not transformers 5.3+'s), and video rows
through the learner's micro-batches: each row keeps its own video tensors, and the logprobs do not depend on the
split."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_sapo.data import ImageRef, Sample, VideoRef, prompt_model_inputs, render_prompt
from vlm_sapo.learner.micro_batches import batch_layout, plan_micro_batches, slice_batch
from vlm_sapo.models.logprobs import build_policy_inputs, rope_position_ids, token_logprobs
from vlm_sapo.models.rope import continue_after_video


def test_text_after_a_video_continues_after_its_largest_position_by_hand():
    """Text 0-2, a video of 2 temporal x 2 x 2 tokens with a temporal step of 4, then 2 text tokens. transformers
    5.3+ continues at 3 + max(h, w) = 5; the released rule at 1 + the block's largest id (3 + 4 = 7), so 8. Row 0 is
    right-padded by two tokens, row 1 left-padded."""
    t = [3, 3, 3, 3, 7, 7, 7, 7]
    h = [3, 3, 4, 4, 3, 3, 4, 4]
    w = [3, 4, 3, 4, 3, 4, 3, 4]
    stock = torch.tensor([[0, 1, 2, *t, 5, 6], [0, 1, 2, *h, 5, 6], [0, 1, 2, *w, 5, 6]])
    types = torch.tensor([0, 0, 0] + [2] * 8 + [0, 0])
    pad3, pad = torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    pos = torch.stack([torch.cat([stock, pad3], 1), torch.cat([pad3, stock], 1)], 1)
    types_b = torch.stack([torch.cat([types, pad]), torch.cat([pad, types])])
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, 13:] = 0
    mask[1, :2] = 0
    fixed, deltas = continue_after_video(pos, types_b, mask)
    expected = torch.cat([stock[:, :11], torch.tensor([[8, 9]] * 3)], 1)
    assert torch.equal(fixed[:, 0, :13], expected) and torch.equal(fixed[:, 1, 2:], expected)
    assert fixed[:, 0, 13:].eq(0).all() and fixed[:, 1, :2].eq(0).all()  # padding untouched
    assert deltas.tolist() == [[9 + 1 - 13]] * 2
    again, _ = continue_after_video(fixed, types_b, mask)
    assert torch.equal(again, fixed)  # idempotent: a model already patched is left as it is


def _video_sample(sid: str, xs: list[int], seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    refs = []
    for x in xs:
        a = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
        a[10:30, x:x + 20] = 200
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        refs.append(ImageRef(data=buf.getvalue()))
    return Sample(sid, "motion", [], "Which way?", "right", video=VideoRef(frames=tuple(refs), num_frames=len(refs)))


@pytest.fixture(scope="module")
def qwen25(tiny_qwen25_dir):
    from vlm_sapo.models.loading import load_policy, load_processor

    processor = load_processor(tiny_qwen25_dir, min_pixels=3136, max_pixels=4 * 784, video_min_pixels=3136,
                               video_max_pixels=3136, video_max_frames=4, video_fps=2.0)
    return load_policy(tiny_qwen25_dir, dtype="float32", device="cpu"), processor


def test_learner_positions_follow_the_released_rule(qwen25):
    model, processor = qwen25
    p = render_prompt(processor, _video_sample("v", [0, 8, 16, 24], 0), instruction="One word.", min_pixels=3136,
                      max_pixels=4 * 784, image_patch_size=14, max_prompt_tokens=None)
    inputs = prompt_model_inputs(processor, p)
    pos = rope_position_ids(model, inputs)[:, 0]
    types = inputs["mm_token_type_ids"][0]
    video = (types == 2).nonzero().flatten()
    first, last = int(video[0]), int(video[-1])
    start = int(pos[0, first - 1]) + 1  # the position the video block starts from
    (t, hh, ww), = inputs["video_grid_thw"].tolist()
    step = model.config.vision_config.tokens_per_second * float(inputs["second_per_grid_ts"][0])
    # independent of both implementations: the block's largest id over the three axes, from its grid alone
    largest = start + max(int((t - 1) * step), hh // 2 - 1, ww // 2 - 1)
    assert int(pos[:, first:last + 1].max()) == largest and step == 4.0
    assert pos[:, last + 1].tolist() == [largest + 1] * 3
    stock, _ = type(model.model).get_rope_index(model.model, inputs["input_ids"], mm_token_type_ids=types[None],
                                                video_grid_thw=inputs["video_grid_thw"],
                                                second_per_grid_ts=inputs["second_per_grid_ts"])
    assert int(stock[0, 0, last + 1]) == start + max(hh, ww) // 2 != largest + 1  # what transformers 5.19 does


def test_video_rows_keep_their_tensors_through_micro_batches(qwen25):
    model, processor = qwen25
    samples = [_video_sample("a", [0, 8, 16, 24], 1), Sample("img", "math", [Image.new("RGB", (56, 56), "red")],
                                                             "Colour?", "red"), _video_sample("b", [30, 20], 2)]
    prompts = [render_prompt(processor, s, instruction="One word.", min_pixels=3136, max_pixels=4 * 784,
                             image_patch_size=14, max_prompt_tokens=None) for s in samples]
    per_prompt = [prompt_model_inputs(processor, p) for p in prompts]
    completions = [[100, 200, 300], [400, 500], [600, 700, 800, 900]]
    batch = build_policy_inputs(per_prompt, completions, processor.tokenizer.pad_token_id)
    assert batch["second_per_grid_ts"].shape == (2,) and batch["video_grid_thw"].shape == (2, 3)
    layout = batch_layout(batch, image_token_id=model.config.image_token_id,
                          video_token_id=model.config.video_token_id, merge_size=2)
    with torch.no_grad():
        full, _ = token_logprobs(model, batch)
    plan = plan_micro_batches(batch["attention_mask"], token_budget=1)  # one row each
    assert len(plan) == 3
    for mb in plan:
        (r,) = mb.rows.tolist()
        part = slice_batch(batch, mb, layout)
        alone = build_policy_inputs([per_prompt[r]], [completions[r]], processor.tokenizer.pad_token_id)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            assert (key in part) == (key in alone), (r, key)
            if key in alone:
                assert torch.equal(torch.as_tensor(part[key]), torch.as_tensor(alone[key])), (r, key)
        with torch.no_grad():
            logp, _ = token_logprobs(model, part)
        torch.testing.assert_close(logp, full[mb.rows][:, mb.cols], atol=1e-5, rtol=0)
