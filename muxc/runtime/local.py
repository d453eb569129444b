"""Local executor: runs a `MuxGraph` in this process, spatially or temporally.

- spatial: every task's batch stacked into one; each frozen op runs ONCE over all tokens, each
  adapter site makes one multi-task kernel call; one backward over the sum of the task losses
  (each adapter only sees its own task's tokens, so each task's gradient is its own).
- temporal: tasks one after another on the same graph, each with its own backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from muxc.ir import MuxGraph
from muxc.kernels.registry import Impl
from muxc.options import Fusion
from muxc.runtime.batch import MuxBatch, build_batch, check_batches

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Executes one MuxGraph; holds no tensors beyond the graph's bindings."""

    def __init__(self, mux: MuxGraph, fusion: Fusion, impl: Impl | None):
        self.mux = mux
        self.fusion = Fusion.SPATIAL if fusion is Fusion.AUTO else fusion
        self.impl = impl
        names = [n for n in mux.input_names() if n in mux.tensors]
        self._bound = [mux.tensors[n] for n in names]
        self.device = self._bound[0].device

    def run(self, ids: torch.Tensor, mask: torch.Tensor, batch: MuxBatch) -> dict[str, torch.Tensor]:
        """Forward only: ``{task: loss}`` for the tasks in ``batch``."""
        losses = self.mux.gm(*self._bound, ids, mask, batch)
        return {t: l for t, l in zip(self.mux.tasks, losses) if l is not None}

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses of every task in ``batches``; adapter ``.grad`` accumulate like PyTorch."""
        check_batches(batches, self.mux.tasks)
        groups = [self.mux.tasks] if self.fusion is Fusion.SPATIAL else [(t,) for t in self.mux.tasks]
        out = {}
        for group in groups:
            if not any(t in batches for t in group):
                continue
            ids, mask, batch = build_batch(batches, group, self.device, self.impl)
            losses = self.run(ids, mask, batch)
            total = sum(losses.values())
            if total.requires_grad:
                total.backward()
            out.update({t: l.detach() for t, l in losses.items()})
        return {t: out[t] for t in self.mux.tasks if t in out}
