"""Worker for test_two_process.py, run under `torchrun --nproc_per_node 2`: one update per case on this rank's share.

The shares are unequal on purpose (rank 0: rows 0-2 with the text-only row, rank 1: rows 3-4; different token,
image and micro-batch counts), so a learner that averaged per-rank means, or made different collective calls on two
ranks, fails the comparison (or hangs). Rank 0 writes `<out>/<loss>_zero<stage>.pt` with metrics and weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script (torchrun): the `tests` package
from tests.learner.learner_batches import make_batch, make_learner, take_rows, weights  # noqa: E402
from vlm_sapo.learner import Objective, UpdateBatch  # noqa: E402

SHARES = ([0, 1, 2], [3, 4])
ADV = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])
CASES = (("sapo", 2), ("dapo", 3))  # a sequence-mean loss under ZeRO-2, a token-mean one under ZeRO-3
# eps=1: Adam's update is ~ linear in the gradient, so a wrongly scaled gradient shows in the weights.
LEARNER = dict(lr=0.5, eps=1.0, betas=(0.9, 0.99), grad_clip=None, micro_batch_tokens=100, logprob_chunk_size=4)


def off_policy_old(learner, batch, rows: list[int]) -> torch.Tensor:
    """old_logp a little off the current policy, the same noise for a row whichever process holds it."""
    noise = torch.randn((5, batch["input_ids"].shape[1]), generator=torch.Generator().manual_seed(7))[rows]
    return (learner.compute_logprobs(batch) + 0.3 * noise) * batch["completion_mask"]


def run_one(model_dir: Path, loss_name: str, zero_stage: int, rows: list[int]) -> tuple[dict, dict]:
    batch = take_rows(make_batch(model_dir), rows, model_dir)
    learner = make_learner(model_dir, zero_stage=zero_stage, **LEARNER)
    old = off_policy_old(learner, batch, rows)
    metrics = learner.update(UpdateBatch(batch, ADV[rows], old), Objective(loss_name))
    return metrics, weights(learner)


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for loss_name, stage in CASES:
        metrics, w = run_one(model_dir, loss_name, stage, SHARES[rank])
        if rank == 0:
            torch.save({"metrics": metrics, "weights": w}, out / f"{loss_name}_zero{stage}.pt")


if __name__ == "__main__":
    main()
