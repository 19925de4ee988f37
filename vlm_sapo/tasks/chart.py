"""Chart QA task, scored by ``rewards.chart`` (ChartQA relaxed accuracy)."""

from __future__ import annotations

from typing import Any

from rewards.chart import extract_chart_answer
from vlm_sapo.tasks.task import FORMAT_INSTRUCTION, Task


def chart_instruction(sample: Any) -> str:
    return f"{FORMAT_INSTRUCTION} The answer is a number, a word or a short phrase read from the chart, e.g. <answer>42</answer>."


CHART = Task(name="chart", reward_name="chart", instruction_for=chart_instruction, parse_answer=extract_chart_answer)
