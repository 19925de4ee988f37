"""Synthetic multimodal tasks (math, chart, grounding; motion, a video task) drawn from a seed, and a small-vocabulary tiny Qwen-VL: the
ingredients of the CPU demo (`python -m vlm_sapo.demo`)."""

from vlm_sapo.demo.synthetic.dataset import SPLITS, generate_split_items, make_synthetic_data
from vlm_sapo.demo.synthetic.tasks import (
    ALL_FAMILIES,
    FAMILIES,
    GENERATORS,
    VIDEO_FAMILIES,
    SyntheticConfig,
    SyntheticItem,
    gold_completion,
)

__all__ = [
    "ALL_FAMILIES",
    "FAMILIES",
    "GENERATORS",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticItem",
    "VIDEO_FAMILIES",
    "generate_split_items",
    "gold_completion",
    "make_synthetic_data",
]
