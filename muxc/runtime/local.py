"""Local executor: runs a `MuxGraph` in this process.

Fusion decides which tasks run together (one group of all tasks for spatial, one group per
task for temporal); alignment decides how a group's samples form the batch:

- pad: each sample is a row, right-padded to the group's longest sample; one forward.
- chunk: each task's samples packed into streams cut into equal chunks; one forward per chunk
  step, with attention K/V kept across a stream's chunks (see `muxc.runtime.chunks`).

Within a group every frozen op runs ONCE over all its tasks' tokens and each adapter site makes
one multi-task kernel call; one backward per group over the sum of its task losses (each
adapter only sees its own task's tokens, so each task's gradient is its own).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from muxc.ir import MuxGraph
from muxc.options import Alignment, Fusion, Options
from muxc.runtime.batch import MuxBatch, BatchSpec, build_batch, check_batches
from muxc.runtime.chunks import ChunkLayout, build_layout
from muxc.partition_ir import run_stages
from muxc.runtime.fusion import AutoFusion

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Executes one MuxGraph; holds no tensors beyond the graph's bindings."""

    def __init__(
        self, mux: MuxGraph, options: Options, partitioned=None, spec: BatchSpec | None = None
    ):
        self.mux = mux
        self.spec = spec  # what every batch is checked against (token id ranges, padding)
        self.partitioned = partitioned if options.stages > 1 else None
        self.alignment = options.alignment
        self.chunk_size = options.chunk_size
        self.impl = options.kernel_impl
        names = mux.input_names()
        self._bound = [mux.tensors[n] for n in names if n in mux.tensors]
        self._inputs = [n for n in names if n not in mux.tensors and n != "mux"]
        self.device = self._bound[0].device
        self.options = options
        self.stages = options.stages
        self.fusion = options.fusion
        self._planner = None
        self.last_plan = None  # the fusion DP's latest plan (fusion="auto")

    @property
    def planner(self) -> AutoFusion:
        """Cost-model pricing of hTasks (built on first use)."""
        if self._planner is None:
            self._planner = AutoFusion(self.mux, self.options)
        return self._planner

    def groups(self, batches: Mapping[str, Mapping] | None = None) -> list[tuple[str, ...]]:
        """Task groups run together (hTasks), in execution order.

        ``fusion="auto"`` asks the fusion DP for the tasks present in ``batches``; absent tasks
        (or no batches) each form their own group, after the planned ones.
        """
        if self.fusion is Fusion.SPATIAL:
            return [self.mux.tasks]
        if self.fusion is Fusion.TEMPORAL or batches is None:
            return [(t,) for t in self.mux.tasks]
        present = {t: b for t, b in batches.items() if t in self.mux.tasks}
        chunk = self.chunk_size_for(batches) if self.alignment is Alignment.CHUNK else None
        self.last_plan = self.planner.plan(present, chunk)
        order = {t: i for i, t in enumerate(self.mux.tasks)}
        planned = [tuple(sorted(h, key=order.get)) for h in self.last_plan.htasks]
        rest = [(t,) for t in self.mux.tasks if t not in present]
        return planned + rest

    def _call(self, inputs: dict[str, torch.Tensor], batch: MuxBatch) -> dict[str, torch.Tensor]:
        args = (*self._bound, *(inputs[n] for n in self._inputs), batch)
        if self.partitioned is not None:  # stage modules in sequence (all in this process)
            losses = run_stages(self.partitioned, *args)
        else:
            losses = self.mux.gm(*args)
        return {t: loss for t, loss in zip(self.mux.tasks, losses) if loss is not None}

    def chunk_size_for(self, batches: Mapping[str, Mapping]) -> int:
        """``chunk_size`` if set, else the cost model's best for these batches."""
        present = {t: b for t, b in batches.items() if t in self.mux.tasks}
        return self.chunk_size or self.planner.best_chunk(present)

    def layout(self, batches: Mapping[str, Mapping], group: tuple[str, ...]) -> ChunkLayout:
        return build_layout(batches, group, self.chunk_size_for(batches), self.device)

    def run_group(self, batches: Mapping[str, Mapping], group: tuple[str, ...], training: bool):
        """Forward the tasks of ``group`` present in ``batches``: ``{task: loss}``."""
        if self.alignment is Alignment.PAD:
            ids, mask, batch = build_batch(batches, group, self.device, self.impl, training)
            return self._call({"input_ids": ids, "attention_mask": mask}, batch)
        layout = self.layout(batches, group)
        kv: dict = {}
        totals: dict[str, torch.Tensor] = {}
        for step in layout.steps:
            labels = torch.split(step.labels, list(step.rows))
            scale = tuple(1.0 / layout.label_counts[t] if layout.label_counts[t] else float("nan") for t in step.tasks)
            batch = MuxBatch(
                tasks=step.tasks, rows=step.rows, seq_len=layout.chunk_size, labels=tuple(labels),
                impl=self.impl, training=training, shifted=True, loss_scale=scale, chunk=step, kv=kv,
            )
            inputs = {"input_ids": step.ids, "attention_mask": torch.ones_like(step.ids), "position_ids": step.positions}
            for t, part in self._call(inputs, batch).items():
                totals[t] = part if t not in totals else totals[t] + part
        return totals

    def losses(self, batches: Mapping[str, Mapping], training: bool = False) -> dict[str, torch.Tensor]:
        """Forward only, every group: ``{task: loss}``."""
        check_batches(batches, self.mux.tasks, self.spec)
        out = {}
        for group in self.groups(batches):
            if any(t in batches for t in group):
                out.update(self.run_group(batches, group, training))
        return {t: out[t] for t in self.mux.tasks if t in out}

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses of every task in ``batches``; adapter ``.grad`` accumulate like PyTorch."""
        check_batches(batches, self.mux.tasks, self.spec)
        out = {}
        for group in self.groups(batches):
            if not any(t in batches for t in group):
                continue
            losses = self.run_group(batches, group, training=True)
            total = sum(losses.values())
            if isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward()
            out.update({t: loss.detach() for t, loss in losses.items()})
        return {t: out[t] for t in self.mux.tasks if t in out}

    def token_stats(self, batches: Mapping[str, Mapping]) -> tuple[int, int]:
        """(tokens computed, real tokens) for ``batches`` under this layout."""
        computed = real = 0
        for group in self.groups(batches):
            present = [t for t in group if t in batches]
            if not present:
                continue
            if self.alignment is Alignment.CHUNK:
                lay = self.layout(batches, group)
                computed += lay.tokens_computed
                real += lay.real_tokens
            else:
                seq = max(batches[t]["input_ids"].shape[1] for t in present)
                computed += sum(batches[t]["input_ids"].shape[0] for t in present) * seq
                real += sum(_real(batches[t]) for t in present)
        return computed, real


def _real(batch: Mapping) -> int:
    m = batch.get("attention_mask")
    return int(m.sum()) if m is not None else batch["input_ids"].numel()
