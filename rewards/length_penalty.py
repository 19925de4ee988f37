"""Example user reward, installed as the entry point `length_penalty` (group `vlm_sapo.rewards` in pyproject.toml).

A reward is a function `(completion, ground_truth, **meta) -> dict` with an `overall` score; every key is logged.
Recipe: `rewards: {functions: [{name: length_penalty, weight: 0.1, kwargs: {max_chars: 1500}}]}`.
"""


def compute_score(completion: str, ground_truth=None, *, max_chars: int = 2000, **meta) -> dict[str, float]:
    penalty = min(1.0, max(0, len(completion) - max_chars) / max_chars)  # 0 within budget, 1 at twice the budget
    return {"overall": 0.0 - penalty, "penalty": penalty}
