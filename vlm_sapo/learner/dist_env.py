"""The process-group set-up DeepSpeed needs, done for the user when the run was not started by a launcher.

Without `RANK`/`WORLD_SIZE`/`MASTER_*` DeepSpeed falls back to MPI discovery (`No module named 'mpi4py'`), so a plain
`python -m vlm_sapo ...` gets a one-process group on a free local port. On CPU the collectives go over gloo.
"""

from __future__ import annotations

import os
import socket

import torch

_DIST_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def ensure_dist_env() -> None:
    """Fill in a one-process group where no launcher (torchrun, deepspeed) set one; keep a launcher's values."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    present = [v for v in _DIST_VARS if v in os.environ]
    if present and len(present) < len(_DIST_VARS):
        missing = sorted(set(_DIST_VARS) - set(present))
        if set(missing) - {"LOCAL_RANK"}:
            raise RuntimeError(f"distributed environment is half set: {', '.join(present)} present but "
                               f"{', '.join(missing)} missing; launch with torchrun/deepspeed or set none of them")
        os.environ["LOCAL_RANK"] = os.environ["RANK"]  # single node: local rank = rank
        return
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling `deepspeed_shm_comm` (about 40 s on a fresh machine).

    That op only serves `inference_all_reduce` (DeepSpeed inference / AutoTP); training collectives go through
    torch.distributed (gloo), so the trainer loses nothing. DeepSpeed keeps its op-compatibility table as one
    module-level dict and reads it before building, so marking the op unavailable there is enough.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def backend() -> str:
    return "nccl" if on_gpu() else "gloo"


def _restart_attempt_store() -> torch.distributed.Store | None:
    """Under torchrun every restart attempt talks to the launcher's one TCPStore, where the previous attempt's ranks
    left their addresses under the same keys; a new attempt can read a dead peer's address and fail (measured on
    torch 2.13 with gloo after `--max-restarts`: "Gloo connectFullMesh failed ... Connection refused" to the killed
    rank's old port). So each attempt gets its own key prefix. None when not under torchrun's agent store."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), is_master=False)
    return torch.distributed.PrefixStore(f"vlm_sapo/attempt_{attempt}", store)


def init_distributed() -> None:
    """Start the process group once (DeepSpeed's `init_distributed` is a no-op when one exists).

    A group torn down behind DeepSpeed's back (vLLM's engine shutdown destroys torch's default group, see
    `VLLMRolloutEngine.close`) leaves DeepSpeed holding its clone of the old world group, and the next engine would
    fail with "Group ... is not registered". So when this call creates the group, DeepSpeed's cached references to
    any earlier one are released first, as DeepSpeed's own `destroy_process_group` would have done.
    """
    ensure_dist_env()
    import deepspeed
    from deepspeed.utils import groups

    if not on_gpu():
        skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        groups._release_process_group_references(None)
        store = _restart_attempt_store()
        if store is not None:
            torch.distributed.init_process_group(backend(), store=store, rank=int(os.environ["RANK"]),
                                                 world_size=int(os.environ["WORLD_SIZE"]))
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False, verbose=False)


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few scalars over ranks in fp64 (global token/sequence counts and metric sums must be exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()
