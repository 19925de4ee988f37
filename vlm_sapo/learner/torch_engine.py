"""A one-process stand-in for what the learner uses of DeepSpeed's engine, on a plain torch optimizer.

For machines without DeepSpeed (`Learner(backend="torch")`; the GPU check's machine has torch, transformers and peft
only). One process, no ZeRO, no data parallel. What it keeps of DeepSpeed's bf16 mode: the module's parameters are
bf16 while AdamW updates fp32 master weights; gradients accumulate in fp32 (a hook moves each bf16 gradient into its
master's `.grad` as soon as it is complete, so no bf16 gradient outlives its backward); a non-finite gradient norm
skips the step (no optimizer or scheduler step, gradients dropped), as DeepSpeed's `check_grad_overflow` does; the
gradient is clipped to `grad_clip` by the same rule (coefficient max_norm / (norm + 1e-6), at most 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_STATE_FILE = "torch_engine.pt"


class TorchEngine:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, *, bf16: bool,
                 grad_clip: float | None, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.grad_clip = grad_clip
        self._applied = False
        self._grad_norm: float | None = None
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (bf16 model parameter, fp32 master)
        if bf16:
            for group in optimizer.param_groups:  # no step taken yet: the groups can be pointed at the masters
                masters = []
                for p in group["params"]:
                    master = p.detach().to(torch.float32).clone().requires_grad_(True)
                    p.data = p.data.to(torch.bfloat16)
                    p.register_post_accumulate_grad_hook(_into_master(master))
                    self._pairs.append((p, master))
                    masters.append(master)
                group["params"] = masters
            for p in module.parameters():  # frozen ones too (vision tower, LoRA base): the forward runs in bf16
                p.data = p.data.to(torch.bfloat16)

    # DeepSpeed engine interface, as far as the learner uses it
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def _trained(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> None:
        params = self._trained()
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._applied = bool(torch.isfinite(norm))
        if self._applied:
            if self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            with torch.no_grad():
                for p, master in self._pairs:
                    p.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)
        self._grad_norm = float(norm)

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False,
                        client_state: dict[str, Any] | None = None) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "masters": [m.detach() for _, m in self._pairs],
                    "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                    "client_state": client_state or {}}, folder / _STATE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str | None, dict[str, Any] | None]:
        path = Path(load_dir) / tag / _STATE_FILE
        if not path.is_file():
            return None, None
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        if len(state["masters"]) != len(self._pairs):
            raise ValueError(f"{path}: {len(state['masters'])} fp32 master weights saved, this engine has "
                             f"{len(self._pairs)} (saved with a different bf16 setting?)")
        with torch.no_grad():
            for (_, master), saved in zip(self._pairs, state["masters"]):
                master.copy_(saved)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return str(path.parent), state["client_state"]


def _into_master(master: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        g = p.grad.to(torch.float32)
        master.grad = g if master.grad is None else master.grad.add_(g)
        p.grad = None

    return hook
