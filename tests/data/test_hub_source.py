"""A data path that is not on disk but looks like a hub id goes to `datasets.load_dataset`; offline, it fails fast."""

from __future__ import annotations

import time

import pytest

from vlm_sapo.data import load_samples
from vlm_sapo.data.loaders import DataError


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"owner-x/no-such-set: not a local path.*HF_HUB_OFFLINE"):
        load_samples("owner-x/no-such-set", task="math")
    assert time.monotonic() - t0 < 90  # a hang would be minutes (hub retries)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        load_samples(tmp_path / "nope.jsonl", task="math")
