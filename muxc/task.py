"""`Task`: one user's fine-tuning job: a PEFT model (which adapter), its optimizer, its schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from muxc.errors import TaskSpecError
from muxc.names import check_name

__all__ = ["Task"]


@dataclass(kw_only=True)
class Task:
    """A fine-tuning task.

    model: an HF ``PeftModel`` (LoRA or IA3) over a causal LM. Several tasks may be separate
      PeftModels over equal base weights, or adapters of one PeftModel (set ``adapter_name``).
    adapter_name: which adapter of ``model`` this task trains (default: the active one).
    optimizer: a torch optimizer over this task's adapter parameters; ``None`` builds
      ``AdamW(lr=lr)`` over them.
    lr_scheduler: optional ``torch.optim.lr_scheduler`` stepped after each optimizer step.
    """

    name: str  # becomes a directory name: see `muxc.names.check_name` for what is refused
    model: Any
    adapter_name: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.lr <= 0:
            raise TaskSpecError(f"task {self.name!r}: lr must be > 0, got {self.lr}")
