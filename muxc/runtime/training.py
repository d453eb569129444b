"""Per-task training state: each task's own optimizer and LR scheduler, never mixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from muxc.errors import TaskSpecError
from muxc.ir import AdapterRecord
from muxc.task import Task

__all__ = ["TaskState", "build_states"]


@dataclass
class TaskState:
    name: str
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    steps: int = 0

    def step(self) -> None:
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


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
        states[t.name] = TaskState(t.name, params, opt, t.lr_scheduler)
    return states
