"""Fixtures of the reliability tests, and the summary line they print at the end of the session.

Tests count what they did through the `tally` fixture: `faults` injected (kills, crashes, hangs, NaNs, full disks,
corrupt files), `recovered` runs (a resume or restart that went on correctly), `lost` samples (a step's sample missing
from, or repeated in, the final metrics log: must stay 0) and `bad_inputs` tried (fuzzed rows, completions, recipes).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.reliability_helpers import FIXTURE

_TALLY = pytest.StashKey[Counter]()


def _counter(config: pytest.Config) -> Counter:
    if _TALLY not in config.stash:
        config.stash[_TALLY] = Counter()
    return config.stash[_TALLY]


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Counter:
    return _counter(request.config)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    counts = _counter(config)
    if not counts:
        return
    terminalreporter.write_sep("=", "reliability report")
    terminalreporter.write_line(
        f"reliability: {counts['faults']} faults injected, {counts['recovered']} runs recovered, "
        f"{counts['lost']} samples lost, {counts['bad_inputs']} bad inputs tried"
    )


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL with a 512-token vocabulary trained on the fixture's text (about 10 s to build).

    With Qwen's real vocabulary a tiny model's checkpoint is 600 MB and a step takes seconds; this one's checkpoint is
    10 MB, so the fault tests can afford a checkpoint every step.
    """
    from vlm_sapo.demo.synthetic.vocab import build_small_vocab_tiny

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    texts = [f"{r['question']} {r['answer']}" for r in rows]
    return build_small_vocab_tiny(tmp_path_factory.mktemp("reliability") / "small_qwen2_5_vl", texts, vocab_size=512)
