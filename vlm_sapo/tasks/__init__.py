"""Tasks: each owns its prompt instruction, answer parser, reward and benchmark metric. Built-ins: math, grounding,
chart, motion (video), mathvista (MathVista's own scoring rule); ``register_task`` adds more."""

from vlm_sapo.tasks.chart import CHART
from vlm_sapo.tasks.grounding import GROUNDING, coord_system_for_family
from vlm_sapo.tasks.math import MATH
from vlm_sapo.tasks.mathvista import MATHVISTA
from vlm_sapo.tasks.motion import MOTION
from vlm_sapo.tasks.task import (
    FORMAT_INSTRUCTION,
    Task,
    default_reward_specs,
    get_task,
    list_tasks,
    metric_key,
    register_task,
)

for _task in (MATH, GROUNDING, CHART, MOTION, MATHVISTA):
    register_task(_task, replace=True)

__all__ = [
    "CHART",
    "FORMAT_INSTRUCTION",
    "GROUNDING",
    "MATH",
    "MATHVISTA",
    "MOTION",
    "Task",
    "coord_system_for_family",
    "default_reward_specs",
    "get_task",
    "list_tasks",
    "metric_key",
    "register_task",
]
