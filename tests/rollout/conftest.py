"""Fixtures of the rollout-engine tests: the tiny Qwen2.5-VL processor and three rendered prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rollout.rollout_helpers import render_test_prompts
from vlm_sapo.data import RenderedPrompt


@pytest.fixture(scope="session")
def tiny25_processor(tiny_qwen25_dir: Path):
    from vlm_sapo.models.loading import load_processor

    return load_processor(tiny_qwen25_dir)


@pytest.fixture(scope="session")
def test_prompts(tiny25_processor) -> list[RenderedPrompt]:
    return render_test_prompts(tiny25_processor)
