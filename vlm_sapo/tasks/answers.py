"""How spread out a task's answers are: the number of distinct answers and the share of the most common one.

RL on a task whose majority answer is rewarded often enough can collapse onto that answer: the mean reward stays up
while the policy stops looking at the image. These two numbers show it on any run, in training (`answers/<task>/...`),
validation (`val/answers/<task>/...`) and `vlm-sapo eval`; `warn_if_collapsed` says so in the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vlm_sapo.tasks.task import get_task

log = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.9  # a task whose most common answer is at least this share of its answers has collapsed
MIN_ANSWERS = 16  # fewer answers than this say too little to warn about


@dataclass(frozen=True)
class AnswerSpread:
    count: int
    distinct: int
    top: str  # the most common answer ("<none>": no answer could be parsed)
    top_share: float

    @property
    def collapsed(self) -> bool:
        return self.count >= MIN_ANSWERS and self.top_share >= COLLAPSE_SHARE

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/distinct": float(self.distinct), f"{prefix}/top_share": self.top_share}

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "distinct": self.distinct, "top": self.top, "top_share": self.top_share}


def answer_key(parsed: Any) -> str:
    """One comparable string per answer: boxes as `[x1, y1, x2, y2]`, text stripped, nothing parsed as `<none>`."""
    if parsed is None or (isinstance(parsed, str) and not parsed.strip()):
        return "<none>"
    if isinstance(parsed, (list, tuple)):
        return "[" + ", ".join(f"{float(v):g}" for v in parsed) + "]"
    return str(parsed).strip()


def parse_answers(task_name: str, completions: Iterable[str]) -> list[Any]:
    """The task's own parser on each completion; a parser that raises gives `None` (counted as no answer)."""
    parse = get_task(task_name).parse_answer
    out = []
    for text in completions:
        try:
            out.append(parse(text))
        except Exception:  # a parser bug must not stop the run; the answer counts as unparsed
            out.append(None)
    return out


def answer_spread(parsed_answers: Iterable[Any]) -> AnswerSpread:
    counts = Counter(answer_key(a) for a in parsed_answers)
    total = sum(counts.values())
    if not total:
        return AnswerSpread(0, 0, "<none>", 0.0)
    top, n = counts.most_common(1)[0]
    return AnswerSpread(total, len(counts), top, n / total)


def warn_if_collapsed(spread: AnswerSpread, task: str, where: str) -> bool:
    if spread.collapsed:
        log.warning("%s: task %s's answers collapsed onto %r (%.0f%% of %d answers, %d distinct): the policy may have "
                    "stopped using its input", where, task, spread.top, 100 * spread.top_share, spread.count,
                    spread.distinct)
    return spread.collapsed
