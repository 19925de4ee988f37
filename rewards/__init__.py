"""Built-in reward functions; a user reward file looks exactly like these.

Each module exposes ``compute_score(completion, ground_truth, **meta) -> dict[str, float]`` with at least ``overall``
(what training uses); a module may set ``REWARD_TYPE = "batch"`` to score a whole batch in one call instead. This
package imports nothing of ``vlm_sapo``. Names are resolved by
``vlm_sapo.scoring.load_reward``.
"""
