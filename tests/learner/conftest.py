"""Fixtures for the learner tests: smaller-than-tiny Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE (fast DeepSpeed steps), a
mixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.learner.learner_batches import build_small, make_batch


@pytest.fixture(scope="session")
def small_qwen25_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small(tmp_path_factory.mktemp("learner") / "small_qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def small_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small(tmp_path_factory.mktemp("learner") / "small_qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def small_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small(tmp_path_factory.mktemp("learner") / "small_qwen3_vl_moe", "qwen3_vl_moe")


@pytest.fixture(scope="session")
def policy_batch(small_qwen25_dir: Path) -> dict[str, torch.Tensor]:
    return make_batch(small_qwen25_dir)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is faster, and far faster on a shared 2-core machine, where OpenMP threads
    spin against other processes (measured: an update 0.8 s with one thread, 1.5-10 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
