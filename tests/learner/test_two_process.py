"""Data parallel over two processes (torchrun, gloo; ZeRO-2 and ZeRO-3) gives the single-process update on the whole
batch, with unequal shares per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.learner.ddp_update import CASES, SHARES, run_one
from tests.learner.learner_batches import load_model
from vlm_sapo.learner.dist_env import free_port

WORKER = Path(__file__).resolve().parent / "ddp_update.py"


@pytest.mark.slow
def test_two_ranks_with_unequal_shares_match_one_process(small_qwen25_dir, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(small_qwen25_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    init = {n: p.detach() for n, p in load_model(small_qwen25_dir).named_parameters()}
    for loss_name, stage in CASES:
        two = torch.load(tmp_path / f"{loss_name}_zero{stage}.pt", weights_only=True)
        m1, w1 = run_one(small_qwen25_dir, loss_name, stage, SHARES[0] + SHARES[1])
        m2, w2 = two["metrics"], two["weights"]
        case = f"{loss_name}, ZeRO-{stage}"
        assert m2["tokens"] == m1["tokens"]
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5), case
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5), case
        moved = max(float((w1[n] - init[n]).abs().max()) for n in w1)
        differ = max(float((w1[n] - w2[n]).abs().max()) for n in w1)
        assert moved > 1e-4 and differ <= 1e-4 * moved, f"{case}: differ by {differ:.3g}, moved {moved:.3g}"
