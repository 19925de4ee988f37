"""Policy batches for the learner tests (also imported by the two-process worker, so no pytest here).

Rows mix what a real rollout batch holds: one image, two images, no image, and completions of different lengths, so
micro-batching must carry each row's own images and the loss scaling must weigh unequal rows correctly. Images are
Geometry3K test figures (MIT, copied into tests/fixtures), downscaled so the tests stay fast.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "geometry3k"

# (image files, question, completion length)
ROWS = (
    (["test_2432.png"], "Find the area of the figure.", 7),
    (["test_2434.png"], "Find G H.", 3),
    ([], "What is 7 times 8?", 5),
    (["test_2468.png", "test_2514.png"], "Which figure has the larger angle?", 9),
    (["test_2529.png"], "Find x.", 2),
)
# Small enough for fast tests: the tiny models' widths halved, vocabulary kept (the real Qwen2 one).
_SMALL_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
    vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2, vision_out_hidden_size=32,
)
SMALL_OVERRIDES = {
    "qwen2_5_vl": dict(_SMALL_COMMON, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 1e6}),
    "qwen3_vl": dict(_SMALL_COMMON, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                  "mrope_interleaved": True, "rope_theta": 5e6}),
}
SMALL_OVERRIDES["qwen3_vl_moe"] = dict(SMALL_OVERRIDES["qwen3_vl"], moe_intermediate_size=24)  # 4 experts, top-2


def build_small(out_dir: Path, family: str = "qwen2_5_vl") -> Path:
    from vlm_sapo.models.tiny import build_tiny

    return build_tiny(out_dir, family, seed=0, **SMALL_OVERRIDES[family])


@functools.lru_cache(maxsize=4)
def _processor(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def make_batch(model_dir: Path, rows=ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """`build_policy_inputs` over real processor outputs, with random (seeded) completions of ordinary tokens."""
    from PIL import Image

    from vlm_sapo.models.logprobs import build_policy_inputs

    processor = _processor(str(model_dir))
    prompts, completions = [], []
    for files, question, n_new in rows:
        images = [Image.open(FIXTURES / "images" / f).convert("RGB").resize((140, 84)) for f in files]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        prompts.append(processor(text=[text], images=images or None, return_tensors="pt"))
        gen = torch.Generator().manual_seed(seed + zlib.crc32(question.encode()))  # a row's completion is its own
        completions.append(torch.randint(1000, 50000, (n_new,), generator=gen).tolist())
    return build_policy_inputs(prompts, completions, pad_id=processor.tokenizer.pad_token_id)


def take_rows(batch: dict[str, torch.Tensor], rows: list[int], model_dir: Path) -> dict[str, torch.Tensor]:
    """The sub-batch of `rows` with exactly their images (what one data-parallel rank receives)."""
    from transformers import AutoConfig

    from vlm_sapo.learner.micro_batches import MicroBatch, batch_layout, slice_batch

    config = AutoConfig.from_pretrained(model_dir)
    layout = batch_layout(batch, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                          merge_size=config.vision_config.spatial_merge_size)
    n_cols = batch["input_ids"].shape[1]
    return slice_batch(batch, MicroBatch(torch.tensor(rows), 0, n_cols), layout)


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


LEARNER_OPTIONS = ("total_steps", "temperature", "kl_reference", "backend", "bf16", "eps", "track_entropy")


def learner_sections(path: Path, **kwargs):
    """The recipe's `learner` and `model` sections and the Learner's own keywords, from one set of keyword arguments:
    fields of either section (`lora` as a dict of LoraCfg fields) or a `LEARNER_OPTIONS` name. Defaults: lr 1e-3, no
    weight decay. The sections are built unvalidated (`model_construct`), as a caller without the recipe's schema
    passes them, so the Learner's own checks are what these tests meet."""
    from vlm_sapo.recipe import LearnerCfg, LoraCfg, ModelCfg

    options = {k: kwargs.pop(k) for k in LEARNER_OPTIONS if k in kwargs}
    model = {k: kwargs.pop(k) for k in list(kwargs) if k in ModelCfg.model_fields}
    unknown = set(kwargs) - set(LearnerCfg.model_fields)
    assert not unknown, f"not a learner or model field, nor a Learner option: {sorted(unknown)}"
    if isinstance(model.get("lora"), dict):
        model["lora"] = LoraCfg(**model["lora"])
    cfg = LearnerCfg.model_construct(**{"lr": 1e-3, "weight_decay": 0.0, **kwargs})
    return cfg, ModelCfg.model_construct(path=str(path), **model), options


def make_learner(path: Path, **kwargs):
    from vlm_sapo.learner import Learner

    cfg, model_cfg, options = learner_sections(path, **kwargs)
    return Learner(load_model(path), cfg, model_cfg, **options)


def weights(learner) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in learner.named_weights_for_rollout()}
