"""The Task object and its open registry.

A task owns everything that makes training and evaluation score alike (as nanochat's ``tasks/`` do): the instruction
appended to each question, the answer parser, the reward (named like a recipe names one, so the reward pool's workers
can load it) and the benchmark metric, which is one key of that same reward's scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlm_sapo.scoring.rewards import RewardSpec, load_reward
from vlm_sapo.suggest import did_you_mean

FORMAT_INSTRUCTION = (
    "First think step by step inside <think> </think> tags, then give only the final answer inside "
    "<answer> </answer> tags."
)


@dataclass(frozen=True)
class Task:
    """``sample`` below is anything with ``.answer`` and ``.meta`` (``vlm_sapo.data.Sample``); for ``instruction_for``
    also ``.question``."""

    name: str
    reward_name: str  # a built-in reward, `path/to/file.py:function`, or an entry point in `vlm_sapo.rewards`
    instruction_for: Callable[[Any], str]  # the text that follows the question in the user message
    parse_answer: Callable[[str], Any]  # the model's answer out of a completion, for logs and eval tables
    metric: str = "accuracy"  # the reward's score reported as the benchmark number

    def instruction(self, sample: Any) -> str:
        """The row's own `instruction` column when it has one (a data set with its own prompt format, as EasyR1's
        `format_prompt`), else the task's. Every prompt renderer asks here, so training and evaluation agree."""
        own = sample.meta.get("instruction") if isinstance(sample.meta, dict) else None
        return own if isinstance(own, str) and own.strip() else self.instruction_for(sample)

    def reward(self, completion: str, sample: Any) -> dict[str, float]:
        """Scores in this process, without the pool's time limit: fine for evaluation of a few samples and tests; a
        training run scores through ``RewardPool`` with ``default_reward_specs``, which calls the same function."""
        return load_reward(self.reward_name).score_one(completion, sample.answer, sample.meta)

    def evaluate(self, completion: str, sample: Any) -> float:
        return self.reward(completion, sample)[self.metric]


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered (pass replace=True to override it)")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        hint = did_you_mean(name, _TASKS)
        raise KeyError(f"unknown task {name!r} (registered: {', '.join(sorted(_TASKS))}){hint}") from None


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def metric_key(task: Task | str, specs: Sequence[RewardSpec | str | Any]) -> str | None:
    """Which of the scores that `specs` give is `task`'s metric: ``"<label>/<task.metric>"`` of the first spec that
    applies to the task and loads the task's own reward function (whatever its label, weight or kwargs), or None when
    no spec does (a recipe that replaced the task's reward). Training validation and evaluation both ask here."""
    task = get_task(task) if isinstance(task, str) else task
    own = load_reward(task.reward_name).fn
    for spec in map(RewardSpec.coerce, specs):
        if spec.applies_to(task.name):
            loaded = load_reward(spec)
            if loaded.fn is own:
                return f"{loaded.label}/{task.metric}"
    return None


def default_reward_specs(task_names: Sequence[str]) -> list[RewardSpec]:
    """The rewards for a recipe that lists none: each task's own reward, on that task's samples only."""
    by_reward: dict[str, list[str]] = {}
    for name in dict.fromkeys(task_names):
        by_reward.setdefault(get_task(name).reward_name, []).append(name)
    return [RewardSpec(reward, tasks=tuple(names)) for reward, names in by_reward.items()]
