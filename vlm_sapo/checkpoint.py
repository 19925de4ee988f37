"""Atomic training checkpoints and Hugging Face export.

A checkpoint `<root>/step_<N>/` holds the learner's state (DeepSpeed's model/optimizer/scheduler files), the RNG
states of every rank, the caller's `trainer_state.json`, and last a `manifest.json` with every file's size and sha256.
It is written into `<root>/.step_<N>.tmp/`, fsynced, then renamed into place, so a crash leaves either a complete
checkpoint or a hidden temporary folder that nothing loads. `latest_valid_checkpoint` verifies the manifest and falls
back to the previous checkpoint, with a warning, when the newest is truncated or corrupt.

A leaf module: the learner is passed in and used through `save_state(folder)`, `load_state(folder)`,
`named_weights_for_rollout()` and `hf_model`. All ranks call save/load/export (they are collectives) and write into
the same folder, so several nodes need a shared filesystem; rank 0 writes the manifest and renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vlm_sapo.models.moe import save_policy

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
LEARNER_DIR = "learner"
RNG_DIR = "rng"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_HF_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|\.bin\.index\.json)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or does not match its manifest."""


class LearnerState(Protocol):
    hf_model: torch.nn.Module

    def save_state(self, folder: str | Path) -> None: ...

    def load_state(self, folder: str | Path) -> None: ...

    def named_weights_for_rollout(self) -> Iterator[tuple[str, torch.Tensor]]: ...


# ------------------------------------------------------------------------------------------------------- ranks
def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _json_text(data: Any, what: str) -> str:
    try:
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (plain numbers, strings, lists, dicts): {e}") from e


def step_of(path: str | Path) -> int | None:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """`step_<N>` folders under root, oldest first (complete or not; temporary folders never)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p))


# ------------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(learner: LearnerState, root: str | Path, step: int, trainer_state: dict[str, Any], *,
                    keep_last: int = 2) -> Path:
    """Write `<root>/step_<step>` atomically and keep the newest `keep_last` checkpoints; returns its path."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    try:
        return _write_checkpoint(learner, Path(root), step, trainer_state, keep_last)
    except Exception:  # a failed save (disk full, ...) leaves nothing behind; an interrupt is left like a crash
        if _rank() == 0:
            shutil.rmtree(Path(root) / f".step_{step}.tmp", ignore_errors=True)
        raise


def _write_checkpoint(learner: LearnerState, root: Path, step: int, trainer_state: dict[str, Any],
                      keep_last: int) -> Path:
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    state_text = _json_text(trainer_state, "trainer_state")  # on every rank, before anyone waits on a barrier
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old")]:  # left by a crash during a save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        (tmp / TRAINER_STATE).write_text(state_text)
    _barrier()
    learner.save_state(tmp / LEARNER_DIR)
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{_rank()}.pt")
    _barrier()  # every rank's files are written
    if _rank() == 0:
        for f in _files(tmp):
            _fsync_file(f)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": _world(),
            "files": {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                      for f in _files(tmp)},
        }
        (tmp / MANIFEST).write_text(_json_text(manifest, "manifest"))
        _fsync_file(tmp / MANIFEST)
        for d in sorted({f.parent for f in _files(tmp)}, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        old = root / f".step_{step}.old"
        if final.exists():  # saving a step again (e.g. after resuming from it): swap, then delete the old one
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest (presence, size, sha256); returns the manifest or raises CheckpointError."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an interrupted save?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest: {e}") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path}: {rel} has {size} bytes, the manifest says {meta['size']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its sha256 in the manifest (corrupt)")
    for required in (TRAINER_STATE, f"{RNG_DIR}/rank_0.pt"):
        if required not in files:
            raise CheckpointError(f"{path}: the manifest lists no {required}")
    return manifest


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest `step_<N>` that passes `verify_checkpoint`; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping invalid checkpoint: {e}", RuntimeWarning, stacklevel=2)
            continue
        return path
    return None


def load_checkpoint(learner: LearnerState, path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Restore learner state and this rank's RNG states from `path`; returns the saved trainer_state."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    learner.load_state(path / LEARNER_DIR)
    rng_file = path / RNG_DIR / f"rank_{_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        warnings.warn(f"{path}: no RNG state for rank {_rank()} (saved with world size {manifest.get('world_size')}); "
                      f"this rank keeps its current RNG", RuntimeWarning, stacklevel=2)
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / TRAINER_STATE}: {e}") from e


# ------------------------------------------------------------------------------------------------------- HF export
def export_hf(learner: LearnerState, processor_or_src_dir: Any, out_dir: str | Path) -> Path:
    """Write the policy (LoRA merged) as a Hugging Face checkpoint that transformers and vLLM load.

    `processor_or_src_dir`: a processor (saved with `save_pretrained`) or the source model folder, whose processor,
    tokenizer and chat-template files are copied. Written to a temporary folder and renamed, like checkpoints.
    All ranks must call (under ZeRO-3 the weights are gathered); rank 0 writes.
    """
    out = Path(out_dir)
    state = {name: t.detach().to("cpu", copy=True) for name, t in learner.named_weights_for_rollout()}
    if _rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_policy(learner.hf_model, tmp, state_dict=state)  # MoE experts in the layout vLLM loads
            if isinstance(processor_or_src_dir, str | os.PathLike):
                src = Path(processor_or_src_dir)
                if not src.is_dir():
                    raise FileNotFoundError(f"export_hf: source folder {src} does not exist")
                for f in src.iterdir():
                    if f.is_file() and not _HF_WEIGHT_FILES.search(f.name) and not (tmp / f.name).exists():
                        shutil.copy2(f, tmp / f.name)
            else:
                processor_or_src_dir.save_pretrained(tmp)
            for f in _files(tmp):
                _fsync_file(f)
            old = out.parent / f".{out.name}.old"
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(tmp, out)
            _fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _barrier()
    return out
