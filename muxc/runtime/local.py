"""Local executor: runs a `StepPlan` in this process, action by action in its schedule's order.

A `StepPlan` names hTasks (tasks fused spatially), each hTask's micro-batches and, per pipeline
stage, the ordered forward/backward actions. The executor decides nothing: it walks
``plan.schedule.execution_order()`` (every stage's own order, dependencies respected) and runs

- forward of micro-batch ``m`` of hTask ``h`` on stage ``s``: the stage's module (the whole
  merged graph at ``stages=1``) over the micro-batch's inputs and what earlier stages sent;
- backward of it: autograd from what that forward produced — the task losses (last stage),
  the activations later stages received (with the gradients they sent back), and the K/V kept
  for later chunks (with the gradients those chunks' backwards left on them).

Between stages and between chunk steps values cross as detached leaves (`Boundary`), so each
action's backward covers exactly its own forward, in the order the plan gives, and the
gradients of everything crossing come back explicitly. A multi-process runtime replaces only
the transport. Within a micro-batch every frozen op runs ONCE over all its tasks' tokens and
each adapter site makes one multi-task kernel call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from muxc.ir import IGNORE_INDEX, MuxBatch, MuxGraph, PartitionedGraph, Step, StepPlan
from muxc.runtime.batch import build_batch
from muxc.runtime.positions import chunk_positions, pad_positions
from muxc.runtime.timeline import Timeline

__all__ = ["LocalExecutor", "Boundary"]


@dataclass
class Boundary:
    """Values one action hands to later ones: ``(original, leaf)`` pairs. Later actions compute
    with ``leaf`` (detached, requires grad); the producer's backward sends ``leaf.grad`` into
    ``original``."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def cut(self, value):
        """A detached stand-in for ``value`` (the value itself when no gradient flows)."""
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return value
        leaf = value.detach().requires_grad_(True)
        self.pairs.append((value, leaf))
        return leaf

    def grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The originals whose stand-ins received gradients, and those gradients."""
        outs, grads = [], []
        for orig, leaf in self.pairs:
            if leaf.grad is not None:
                outs.append(orig)
                grads.append(leaf.grad)
        return outs, grads


@dataclass
class _MicroBatch:
    """Per (hTask, micro-batch): the graph arguments and what each stage produced."""

    inputs: dict[str, torch.Tensor]
    mux: MuxBatch
    env: dict = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    sent: dict[int, Boundary] = field(default_factory=dict)  # stage -> what it handed on
    received: list = field(default_factory=list)  # values another rank sent this stage
    sent_values: list = field(default_factory=list)  # values this stage sent another rank
    last_chunk: bool = False  # the hTask's last chunk step: no later chunk reads its K/V


class LocalExecutor:
    """Executes `StepPlan`s of one MuxGraph (optionally cut into stages); holds no tensors
    beyond the graph's bindings between steps. ``executed`` lists the actions of the last run,
    in the order they ran."""

    def __init__(self, mux: MuxGraph, partitioned: PartitionedGraph | None, impl=None):
        self.mux = mux
        self.partitioned = partitioned if partitioned is not None and len(partitioned.stages) > 1 else None
        self.impl = impl
        names = mux.input_names()
        self._bound_names = [n for n in names if n in mux.tensors]
        self._inputs = [n for n in names if n not in mux.tensors and n != "mux"]
        self.device = mux.tensors[self._bound_names[0]].device
        self.executed: list[Step] = []
        self.timeline: Timeline | None = None
        # the action in progress; after `run` raised, the one that raised (None: none had begun)
        self.running: Step | None = None

    # ------------------------------------------------------------------ inputs

    def _pad_micro_batches(self, batches, tasks, m: int, training: bool) -> list[_MicroBatch]:
        heads = self.mux.heads
        ids, mask, full = build_batch(batches, tasks, self.device, self.impl, training, heads)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self._inputs:  # a prefix-tuning task's positions follow its prefix
            inputs["position_ids"] = pad_positions(self.mux, mask, full)
        if m == 1:
            return [_MicroBatch(inputs, full)]
        counts = [heads[t].label_count(lab) if t in heads and heads[t].problem == "seq_cls" else
                  int((torch.nn.functional.pad(lab, (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX).sum())
                  for t, lab in zip(full.tasks, full.labels)]
        starts = [sum(full.rows[:i]) for i in range(len(full.rows))]
        out = []
        for k in range(m):
            names, rows, labels, scale, sel, pooled = [], [], [], [], [], []
            for i, t in enumerate(full.tasks):
                lo, hi = full.rows[i] * k // m, full.rows[i] * (k + 1) // m
                if hi > lo:
                    names.append(t)
                    rows.append(hi - lo)
                    labels.append(full.labels[i][lo:hi])
                    scale.append(1.0 / counts[i] if counts[i] else float("nan"))
                    sel.append(torch.arange(starts[i] + lo, starts[i] + hi))
                    pooled.append(None if full.pooled is None or full.pooled[i] is None
                                  else full.pooled[i][lo:hi])
            idx = torch.cat(sel).to(self.device)
            mux = MuxBatch(tasks=tuple(names), rows=tuple(rows), seq_len=full.seq_len,
                           labels=tuple(labels), impl=self.impl, training=training,
                           loss_scale=tuple(scale),
                           pooled=tuple(pooled) if any(p is not None for p in pooled) else None)
            out.append(_MicroBatch({k: v[idx] for k, v in inputs.items()}, mux))
        return out

    def _chunk_micro_batches(self, layout, training: bool) -> list[_MicroBatch]:
        kv: dict = {}
        out = []
        for step in layout.steps:
            labels = list(torch.split(step.labels, list(step.rows)))
            scale = tuple(1.0 / layout.label_counts[t] if layout.label_counts[t] else float("nan")
                          for t in step.tasks)
            pooled = [None] * len(step.tasks)
            for i, t in enumerate(step.tasks):  # sequence classification: the samples pooled here
                if t in step.pooled:
                    pooled[i], labels[i] = step.pooled[t]
            mux = MuxBatch(tasks=step.tasks, rows=step.rows, seq_len=layout.chunk_size,
                           labels=tuple(labels), impl=self.impl, training=training, shifted=True,
                           loss_scale=scale, chunk=step, kv=kv,
                           pooled=tuple(pooled) if step.pooled else None)
            inputs = {"input_ids": step.ids, "attention_mask": torch.ones_like(step.ids),
                      "position_ids": chunk_positions(self.mux, step)}
            out.append(_MicroBatch(inputs, mux, last_chunk=step is layout.steps[-1]))
        return out

    # ------------------------------------------------------------------ actions

    def _args(self, mb: _MicroBatch) -> list:
        bound = [self.mux.tensors[n] for n in self._bound_names]
        return [*bound, *(mb.inputs[n] for n in self._inputs), mb.mux]

    def _set_losses(self, mb: _MicroBatch, losses) -> None:
        """Keep the graph's per-task losses (None for tasks not in this micro-batch)."""
        mb.losses = {t: l for t, l in zip(self.mux.tasks, losses) if l is not None}

    @staticmethod
    def _cut_kept_kv(mb: _MicroBatch, before: dict | None, cut: Boundary) -> None:
        """Hand the K/V an action kept for later chunks (entries changed since ``before``) to
        them through ``cut``, so their backwards send its gradient back to this action. The
        last chunk's entries are dropped instead: no chunk reads them, and kept they would hold
        that chunk's whole K/V until the step ends."""
        if before is None:
            return
        for key, kv in list(mb.mux.kv.items()):
            if before.get(key) is not kv:
                if mb.last_chunk:
                    del mb.mux.kv[key]
                else:
                    mb.mux.kv[key] = tuple(cut.cut(x) for x in kv)

    @staticmethod
    def _release_graph(mb: _MicroBatch) -> None:
        """After the last stage's backward of ``mb``: keep its losses' values, not their graph
        (through it the K/V stand-ins and their gradients would live until the step ends)."""
        mb.losses = {t: l.detach() for t, l in mb.losses.items()}

    def _forward(self, mb: _MicroBatch, stage: int, grad: bool) -> None:
        cut = Boundary()
        before = dict(mb.mux.kv) if mb.mux.kv is not None else None
        if self.partitioned is None:
            self._set_losses(mb, self.mux.gm(*self._args(mb)))
        else:
            pg = self.partitioned
            if stage == 0:
                mb.env = pg.bind(*self._args(mb))
            pg.stages[stage].run(mb.env)
            if stage == len(pg.stages) - 1:
                self._set_losses(mb, pg.result(mb.env))
            elif grad:
                for name in pg.stages[stage].outputs:
                    mb.env[name] = cut.cut(mb.env[name])
        if grad:
            self._cut_kept_kv(mb, before, cut)
        mb.sent[stage] = cut

    @staticmethod
    def _add_losses(mb: _MicroBatch, outs: list, grads: list) -> None:
        """Append the sum of ``mb``'s task losses (seed gradient 1) to a backward's roots."""
        total = [l for l in mb.losses.values() if l.requires_grad]
        if total:
            outs.append(torch.stack(total).sum() if len(total) > 1 else total[0])
            grads.append(torch.ones_like(outs[-1]))

    def _backward(self, mb: _MicroBatch, stage: int) -> None:
        outs, grads = mb.sent.pop(stage).grads()
        last = self.partitioned is None or stage == len(self.partitioned.stages) - 1
        if last:
            self._add_losses(mb, outs, grads)
        if outs:
            torch.autograd.backward(outs, grads)
        if last:
            self._release_graph(mb)

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-task flags as every process sees them (one process: as they are)."""
        return flags

    # ------------------------------------------------------------------ running

    def micro_batches(self, plan: StepPlan, batches: Mapping[str, Mapping],
                      training: bool) -> list[list[_MicroBatch]]:
        """Per hTask of ``plan``, its micro-batches' graph inputs."""
        micro: list[list[_MicroBatch]] = []
        for h in plan.htask_plans:
            if h.layout is not None:
                micro.append(self._chunk_micro_batches(h.layout, training))
            else:
                micro.append(self._pad_micro_batches(batches, h.tasks, h.micro_batches, training))
        return micro

    def totals(self, micro: list[list[_MicroBatch]], detach: bool) -> dict[str, torch.Tensor]:
        """Each task's loss: the sum of its micro-batches' shares."""
        totals: dict[str, torch.Tensor] = {}
        for parts in micro:
            for mb in parts:
                for t, loss in mb.losses.items():
                    loss = loss.detach() if detach else loss
                    totals[t] = loss if t not in totals else totals[t] + loss
        return {t: totals[t] for t in self.mux.tasks if t in totals}

    def run(self, plan: StepPlan, batches: Mapping[str, Mapping], training: bool = True,
            backward: bool = True) -> dict[str, torch.Tensor]:
        """Run ``plan`` on ``batches``: ``{task: loss}`` (detached when ``backward``); adapter
        ``.grad`` accumulate like PyTorch when ``backward``. ``timeline`` records each action's
        start and end (seconds from the step's start)."""
        grad = backward and torch.is_grad_enabled()
        self.running = None
        micro = self.micro_batches(plan, batches, training)
        self.executed = []
        self.timeline = Timeline(plan.stages)
        for step in plan.schedule.execution_order():
            mb = micro[step.htask][step.micro_batch]
            if not (step.is_forward or grad):
                continue
            self.running = step
            with self.timeline.record(step):
                if step.is_forward:
                    self._forward(mb, step.stage, grad)
                else:
                    self._backward(mb, step.stage)
            self.executed.append(step)
        self.running = None
        return self.totals(micro, detach=grad)
