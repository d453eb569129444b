"""Position ids when a prefix-tuning task is in the program: each task's rows numbered as HF
numbers them after that task's prefix (0 tokens for tasks without one): a pad-aligned batch by
`muxc.ir.prefix.task_positions`, a chunk step by shifting its per-sample positions."""

from __future__ import annotations

import torch

from muxc.ir import AdapterKind, MuxBatch, MuxGraph
from muxc.ir.prefix import task_positions

__all__ = ["prefix_offsets", "pad_positions", "chunk_positions"]


def prefix_offsets(mux: MuxGraph) -> dict[str, int]:
    """Task -> its number of virtual tokens (tasks without a prefix are left out)."""
    return {r.task: r.rank for t in mux.tasks for r in mux.adapters.get(t, ())
            if r.kind is AdapterKind.PREFIX}


def pad_positions(mux: MuxGraph, mask: torch.Tensor, batch: MuxBatch) -> torch.Tensor:
    """``(rows, seq)`` position ids for the stacked ``mask`` laid out as ``batch``."""
    offsets = prefix_offsets(mux)
    parts = []
    for t in batch.tasks:
        lo, hi = batch.row_range(t)
        parts.append(task_positions(mux.model_type, mask[lo:hi], offsets.get(t, 0)))
    return torch.cat(parts)


def chunk_positions(mux: MuxGraph, step) -> torch.Tensor:
    """A chunk step's position ids (restarting per packed sample), each prefix task's rows
    shifted by its prefix length (its samples are right-padded: HF's rules agree there)."""
    offsets = prefix_offsets(mux)
    if not any(t in offsets for t in step.tasks):
        return step.positions
    shift = torch.tensor([offsets.get(t, 0) for t in step.tasks], dtype=step.positions.dtype)
    rows = torch.tensor(step.rows)
    return step.positions + shift.repeat_interleave(rows).to(step.positions.device)[:, None]
