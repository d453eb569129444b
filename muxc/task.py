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
    grad_accumulation: micro-batches whose gradients add up before each optimizer step: the
      task's optimizer steps on every ``grad_accumulation``-th ``Program.step`` it is in, on the
      mean of those micro-batches' gradients (HF Trainer's ``gradient_accumulation_steps``).
    max_grad_norm: clip the task's adapter gradients to this global L2 norm before each of its
      optimizer steps (``torch.nn.utils.clip_grad_norm_``); None: no clipping.
    """

    name: str  # becomes a directory name: see `muxc.names.check_name` for what is refused
    model: Any
    adapter_name: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    lr: float = 1e-3
    grad_accumulation: int = 1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.lr <= 0:
            raise TaskSpecError(f"task {self.name!r}: lr must be > 0, got {self.lr}")
        k = self.grad_accumulation
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TaskSpecError(
                f"task {self.name!r}: grad_accumulation must be an int >= 1, got {k!r}")
        g = self.max_grad_norm
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
            raise TaskSpecError(f"task {self.name!r}: max_grad_norm must be a number > 0 or None, "
                                f"got {g!r}")
