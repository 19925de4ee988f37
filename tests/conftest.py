"""Session fixtures shared by every test folder: tiny random Qwen-VL checkpoints and the shared benchmark samples."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL (real Qwen2 vocabulary, fp32), built once per test session (about 2 s)."""
    from vlm_sapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL (real Qwen2 vocabulary, fp32), built once per test session (about 2 s)."""
    from vlm_sapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen3_vl", "qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL-MoE (4 experts, top-2, real Qwen2 vocabulary, fp32), built once per test session."""
    from vlm_sapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen3_vl_moe", "qwen3_vl_moe", seed=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<repo>/../shared/data` (real benchmark samples, read at test time only); skips loudly when absent."""
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(
            f"SKIPPED: shared benchmark data not found at {path} (expected <repo>/../shared/data); "
            "tests that read real samples cannot run on this machine"
        )
    return path


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_process_group_env():
    """An in-process learner sets RANK/MASTER_PORT/... in os.environ for its one-process group; a training
    subprocess started by a later test would inherit them and try to listen on the parent's port. Drop the ones a
    test added (the process group itself stays up for later in-process tests)."""
    import os

    before = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
