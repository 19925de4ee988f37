"""Fault injection for the reliability tests, kept out of the training loop: named points that do nothing by default.

The trainer passes through each point once per step (`before_rollout`, `after_rollout`, `advantages`, `after_update`,
`mid_checkpoint`, `after_checkpoint`); `Faults` ignores them all, `EnvFaults` fires what `VLM_SAPO_FAULT` asks for:
comma-separated

- `kill_at:rollout:<step>`: SIGKILL after the step's (first round of) rollouts, before they are scored;
- `kill_at:update:<step>`: SIGKILL after the step's first update;
- `kill_at:checkpoint:<step>`: SIGKILL mid-checkpoint (learner state written, manifest not);
- `kill_at:log:<step>`: SIGKILL after the checkpoint but before the metrics line;
- `nan_loss:<step>`: NaN advantages (the learner's non-finite guard must skip the update);
- `engine_death:<step>`: the rollout engine dies from inside from then on (`engine.inject_death`, vLLM only).

Each fires once per process tree: it is removed from the environment when it fires, so a restarted process does not
repeat it. `<fault>:<step>@<rank>` fires on that rank only; under torchrun a restarted attempt
(`TORCHELASTIC_RESTART_COUNT` > 0) fires none, since the launcher restarts from its own, unchanged environment.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger(__name__)

FAULT_ENV = "VLM_SAPO_FAULT"


class Faults:
    """The fault points of a training step; each is a no-op here."""

    def before_rollout(self, step: int, engine: Any) -> None:
        """Before the step's rollouts are generated."""

    def after_rollout(self, step: int) -> None:
        """After a round of the step's rollouts, before they are scored."""

    def advantages(self, step: int, advantages: Any) -> Any:
        """The step's advantages, as the learner will see them."""
        return advantages

    def after_update(self, step: int) -> None:
        """After each learner update of the step."""

    def mid_checkpoint(self, step: int, learner: Any) -> None:
        """Before the step's checkpoint is written (a fault may wrap what the learner writes)."""

    def after_checkpoint(self, step: int) -> None:
        """After the step's checkpoint, before its metrics line."""


class EnvFaults(Faults):
    """The faults `VLM_SAPO_FAULT` asks for (see the module docstring)."""

    def before_rollout(self, step: int, engine: Any) -> None:
        if due("engine_death", step):
            engine.inject_death(f"{FAULT_ENV} engine_death")

    def after_rollout(self, step: int) -> None:
        if due("kill_at:rollout", step):
            sigkill_self()

    def advantages(self, step: int, advantages: Any) -> Any:
        return advantages * float("nan") if due("nan_loss", step) else advantages

    def after_update(self, step: int) -> None:
        if due("kill_at:update", step):
            sigkill_self()

    def mid_checkpoint(self, step: int, learner: Any) -> None:
        if due("kill_at:checkpoint", step):  # dies mid-save: learner state written, no manifest yet
            save_state = learner.save_state
            learner.save_state = lambda folder: (save_state(folder), sigkill_self())

    def after_checkpoint(self, step: int) -> None:
        if due("kill_at:log", step):
            sigkill_self()


def from_env() -> Faults:
    """`EnvFaults` when `VLM_SAPO_FAULT` is set, else the no-op `Faults`."""
    return EnvFaults() if os.environ.get(FAULT_ENV, "").strip() else Faults()


def due(name: str, step: int) -> bool:
    """True once when `VLM_SAPO_FAULT` asks for fault `name` at `step` (removing it from the environment)."""
    entries = [e.strip() for e in os.environ.get(FAULT_ENV, "").split(",") if e.strip()]
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return False
    for key in (f"{name}:{step}", f"{name}:{step}@{os.environ.get('RANK', '0')}"):
        if key in entries:
            entries.remove(key)
            os.environ[FAULT_ENV] = ",".join(entries)
            log.warning("%s: injecting fault %s", FAULT_ENV, key)
            return True
    return False


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
