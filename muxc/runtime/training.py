"""Per-task training state: each task's own optimizer and LR scheduler, never mixed.

A task whose loss or gradients are non-finite skips its optimizer step (`TaskState.skip_bad`);
after ``limit`` such steps in a row it is paused until `TaskState.resume`. A task with
``accumulation`` k steps its optimizer on every k-th micro-step, on the mean gradient, after
clipping it to ``max_grad_norm`` when set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from muxc.errors import TaskSpecError
from muxc.ir import AdapterRecord
from muxc.task import Task

__all__ = ["TaskState", "StepOutcome", "build_states", "nonfinite"]


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one task in the latest ``forward_backward``/``step``.

    loss: the task's loss (None when it was left out before the forward).
    skipped: True when the task's optimizer did not step (or its forward did not run).
    why: "" when it ran, else e.g. "no label tokens", "non-finite loss", "non-finite grad",
      "paused".
    retried: "" unless the step ran out of memory and was run again with a fused hTask split;
      then what ran out of memory and the hTasks of the retry (the same for every task).
    """

    loss: float | None
    skipped: bool = False
    why: str = ""
    retried: str = ""


@dataclass
class TaskState:
    name: str
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    steps: int = 0
    bad_steps: int = 0  # consecutive steps skipped for non-finite loss or gradients
    paused: bool = False
    accumulation: int = 1  # micro-steps whose gradients add up before an optimizer step
    max_grad_norm: float | None = None  # clip to this L2 norm before the optimizer step
    micro_steps: int = 0  # micro-steps accumulated since the last optimizer step

    def step(self) -> bool:
        """One micro-step done: on the ``accumulation``-th, average the summed gradients, clip
        them, step the optimizer and scheduler and zero the gradients. Returns whether the
        optimizer stepped."""
        self.micro_steps += 1
        self.bad_steps = 0
        if self.micro_steps < self.accumulation:
            return False
        self.micro_steps = 0
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.accumulation > 1 and grads:
            torch._foreach_div_(grads, float(self.accumulation))
        if self.max_grad_norm is not None and grads:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def skip_bad(self, limit: int) -> None:
        """Drop this step's (non-finite) gradients without stepping; pause after ``limit``
        bad steps in a row. The adapter, optimizer state and LR schedule are untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps = 0  # the micro-steps accumulated so far are dropped with it
        self.bad_steps += 1
        self.paused = self.bad_steps >= limit

    def resume(self) -> None:
        self.bad_steps = 0
        self.paused = False


def nonfinite(
    losses: Mapping[str, torch.Tensor], states: Mapping[str, TaskState], agree=None
) -> dict[str, str]:
    """Task -> "non-finite loss" | "non-finite grad" for the tasks in ``losses`` whose loss or
    adapter ``.grad`` holds NaN/inf (one device sync for all tasks). ``agree(flags)`` combines
    the (tasks, 2) finite flags across processes holding parts of the adapters (stages)."""
    flags = []
    for name, loss in losses.items():
        grads = [p.grad.isfinite().all() for p in states[name].params if p.grad is not None]
        grad_ok = torch.stack(grads).all() if grads else torch.ones((), dtype=torch.bool)
        flags.append(torch.stack([loss.isfinite().all(), grad_ok.to(loss.device)]))
    if not flags:
        return {}
    flags = torch.stack(flags)
    if agree is not None:
        flags = agree(flags)
    out = {}
    for name, (loss_ok, grad_ok) in zip(losses, flags.tolist()):
        if not loss_ok:
            out[name] = "non-finite loss"
        elif not grad_ok:
            out[name] = "non-finite grad"
    return out


def build_states(tasks: list[Task], records: dict[str, list[AdapterRecord]]) -> dict[str, TaskState]:
    """One TaskState per task; adapter params are made trainable; user optimizers are checked."""
    for recs in records.values():
        for r in recs:
            for p in r.params.values():
                p.requires_grad_(True)
    states = {}
    for t in tasks:
        params = [p for r in records[t.name] for p in r.params.values()]
        opt = t.optimizer
        if opt is None:
            opt = torch.optim.AdamW(params, lr=t.lr)
        else:
            mine = {id(p) for p in params}
            theirs = [p for group in opt.param_groups for p in group["params"]]
            foreign = [p for p in theirs if id(p) not in mine and p.requires_grad]
            if foreign:
                raise TaskSpecError(
                    f"task {t.name!r}: its optimizer holds {len(foreign)} tensor(s) that are not "
                    f"this task's adapter parameters (shape {tuple(foreign[0].shape)}); build it "
                    "over this task's adapter only, e.g. [p for n, p in model.named_parameters() "
                    "if p.requires_grad]"
                )
        states[t.name] = TaskState(t.name, params, opt, t.lr_scheduler,
                                   accumulation=t.grad_accumulation, max_grad_norm=t.max_grad_norm)
    return states
