"""Policy losses, advantage estimators and KL/mismatch tools: plain torch functions, registered by name.

A leaf of the package: imports torch only, so the learner, trainer and tests share one definition of each algorithm.
"""

from vlm_sapo.algos.advantages import (
    AdvantageEstimator,
    get_advantage_estimator,
    list_advantage_estimators,
    register_advantage_estimator,
    takes_components,
    zero_variance_groups,
)
from vlm_sapo.algos.aggregation import AGGREGATIONS, aggregate, aggregation_weight
from vlm_sapo.algos.kl import KL_ESTIMATORS, kl_penalty, mismatch_metrics, truncated_is_weight
from vlm_sapo.algos.losses import (
    PolicyLoss,
    get_policy_loss,
    list_policy_losses,
    policy_loss_aggregation,
    register_policy_loss,
)
from vlm_sapo.algos.overlong import overlong_penalty
from vlm_sapo.algos.regime import observe_policy_losses, regime_metrics

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdvantageEstimator",
    "PolicyLoss",
    "aggregate",
    "aggregation_weight",
    "get_advantage_estimator",
    "get_policy_loss",
    "kl_penalty",
    "list_advantage_estimators",
    "list_policy_losses",
    "mismatch_metrics",
    "observe_policy_losses",
    "overlong_penalty",
    "policy_loss_aggregation",
    "register_advantage_estimator",
    "register_policy_loss",
    "regime_metrics",
    "takes_components",
    "truncated_is_weight",
    "zero_variance_groups",
]
