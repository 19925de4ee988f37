"""Logprob equality of the tiny Qwen3-VL-MoE on both rollout engines, with and without routing replay (R3).

    .venv/bin/python benchmarks/moe_logprobs.py              # about 2 minutes on 2 CPU cores (vLLM start-up included)
    .venv/bin/python benchmarks/moe_logprobs.py --no-vllm    # the transformers engine only

`tiny:qwen3_vl_moe` (2 layers of 4 experts, top-2, real vocabulary), three prompts (two images of different sizes and
a text-only one) x G samples at temperature 0.9. Printed: the largest |engine logprob - learner logprob| over all
completion tokens, where the learner is `token_logprobs` over a right-padded batch (what `Learner` runs): for the
transformers engine free and with the engine's recorded experts replayed (R3); then with every router's weights
moved by `--move` of their std (the current router picks other experts for some tokens: the flipped fraction, and the
difference without and with replay); for vLLM, at start and after a weight update of all experts and routers.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_sapo.data import Sample, prompt_model_inputs, render_prompt  # noqa: E402
from vlm_sapo.models.logprobs import build_policy_inputs, token_logprobs  # noqa: E402
from vlm_sapo.models.routing import record_routing, routed_experts_batch  # noqa: E402
from vlm_sapo.rollout import SamplingConfig  # noqa: E402


def prompts(processor):
    rng = np.random.default_rng(0)
    rows = [((120, 70), "What is the area of the red box?"), ((56, 150), "How many shapes are there?"),
            (None, "What is 2 + 3?")]
    out = []
    for i, (size, question) in enumerate(rows):
        images = [] if size is None else [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))]
        out.append(render_prompt(processor, Sample(f"p{i}", "math", images, question, "A"), instruction="Answer.",
                                 min_pixels=64 * 64, max_pixels=12 * 32 * 32, image_patch_size=16,
                                 max_prompt_tokens=None))
    return out


def learner_side(model, processor, rendered, ro, temperature, replay):
    """Max |engine - learner| logprob, and the fraction of fed (token, layer) routings the learner's forward chose
    differently from the engine's (when the engine recorded them)."""
    comps = ro.completions
    per_prompt = [prompt_model_inputs(processor, p) for p in rendered]
    batch = build_policy_inputs([per_prompt[c.prompt_index] for c in comps], [c.completion_ids for c in comps],
                                processor.tokenizer.pad_token_id)
    routed = None
    if comps[0].routed_experts is not None:
        routed = routed_experts_batch([c.routed_experts for c in comps], batch["input_ids"].shape[1])
        if replay:
            batch["routed_experts"] = routed
    with torch.no_grad(), record_routing(model) as rec:
        logp, _ = token_logprobs(model, batch, temperature=temperature)
    diff = max(float((logp[b, len(c.prompt_ids): len(c.prompt_ids) + len(c.completion_ids)] - c.logprobs).abs().max())
               for b, c in enumerate(comps))
    if routed is None:
        return diff, None
    used = rec.calls[0].view(*routed.shape)
    fed = routed[..., 0, 0] >= 0
    same = (used.sort(-1).values == routed.long().sort(-1).values).all(-1)
    return diff, 1 - float(same[fed].float().mean())


def move_routers(model, scale):
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return moved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen3_vl_moe")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--move", type=float, default=0.5)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args(argv)
    from vlm_sapo.models.loading import load_policy, load_processor
    from vlm_sapo.models.tiny import resolve_tiny
    from vlm_sapo.rollout.hf_engine import HFRolloutEngine

    path = resolve_tiny(args.model)
    processor = load_processor(path)
    model = load_policy(path, dtype="float32", device="cpu").eval()
    rendered = prompts(processor)
    sampling = SamplingConfig(temperature=0.9, max_new_tokens=args.max_new_tokens, seed=0)
    ro = HFRolloutEngine(model, processor, return_routed_experts=True).generate(rendered, args.n, sampling)
    tokens = sum(len(c.completion_ids) for c in ro.completions)
    print(f"{args.model}: {len(ro)} completions, {tokens} completion tokens")
    for replay in (False, True):
        diff, flipped = learner_side(model, processor, rendered, ro, 0.9, replay)
        print(f"hf engine, same weights, {'R3 replay' if replay else 'free routing'}: max |diff| {diff:.2e}, "
              f"routing differs on {flipped:.1%} of fed token-layers")
    moved = move_routers(model, args.move)
    for replay in (False, True):
        diff, flipped = learner_side(moved, processor, rendered, ro, 0.9, replay)
        print(f"hf engine, routers moved by {args.move} std, {'R3 replay' if replay else 'free routing'}: "
              f"max |diff| {diff:.2e}, routing differs on {flipped:.1%} of fed token-layers")
    if args.no_vllm:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vlm_sapo.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(path, processor, max_model_len=512, kv_cache_gib=1)
    try:
        v = engine.generate(rendered, args.n, sampling)
        print(f"vllm engine, at start: max |diff| {learner_side(model, processor, rendered, v, 0.9, False)[0]:.2e}")
        new = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in new.named_parameters():
                if ".mlp." in name and "language_model" in name:
                    p.add_(p.std() * torch.randn(p.shape, generator=g))
        engine.update_weights(new.named_parameters())
        v = engine.generate(rendered, args.n, sampling)
        print(f"vllm engine, after updating every expert and router: max |diff| "
              f"{learner_side(new, processor, rendered, v, 0.9, False)[0]:.2e}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
