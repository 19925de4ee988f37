"""Scoring: which rewards a recipe names and how they load (``vlm_sapo.scoring.rewards``), and the worker pool that
runs them in isolation (``vlm_sapo.scoring.pool``). Importing this package does not import the pool."""

from vlm_sapo.scoring.rewards import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    InProcessScorer,
    LoadedReward,
    RewardError,
    RewardSpec,
    ScoreItem,
    ScoreResult,
    as_scores,
    load_reward,
)

__all__ = [
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "InProcessScorer",
    "LoadedReward",
    "RewardError",
    "RewardSpec",
    "ScoreItem",
    "ScoreResult",
    "as_scores",
    "load_reward",
]
