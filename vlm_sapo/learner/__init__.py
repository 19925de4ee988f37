"""The DeepSpeed policy learner: log-probs, micro-batched updates with exact loss scaling, weights for the rollout.

Imports leaves only (`vlm_sapo.algos`, `vlm_sapo.models`); never tasks, rewards, rollout or data.
"""

from vlm_sapo.learner.learner import Learner
from vlm_sapo.learner.update_batch import Objective, UpdateBatch

__all__ = ["Learner", "Objective", "UpdateBatch"]
