"""The compiler as one readable list of passes, and the thin driver that runs it.

Each step reads named values of the compile state and writes one. The driver times each pass,
records ``(name, seconds, summary)`` in the history, and, with ``Options(verify=True)``, runs
the invariant checks of `muxc.verify` after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from muxc.options import Options
from muxc.passes import (
    merge_backbones,
    partition,
    rewrite_attention,
    select_kernels,
    share_frozen_weights,
    trace_tasks,
    validate_tasks,
)

__all__ = ["Pass", "PIPELINE", "PassRecord", "CompileContext", "run_pipeline"]


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable
    reads: str
    writes: str
    why: str


PIPELINE: tuple[Pass, ...] = (
    Pass("validate_tasks", validate_tasks, "tasks", "tasks", "fail fast, before any tracing"),
    Pass("trace_tasks", trace_tasks, "tasks", "task_graphs", "one export graph per task, adapters opaque"),
    Pass("share_frozen_weights", share_frozen_weights, "task_graphs", "task_graphs", "one copy of the base"),
    Pass("merge_backbones", merge_backbones, "task_graphs", "mux_graph", "each frozen op once for all tasks"),
    Pass("rewrite_attention", rewrite_attention, "mux_graph", "mux_graph", "chunks attend to kept K/V"),
    Pass("partition", partition, "mux_graph", "partitioned", "subgraphs + cost-balanced pipeline stages"),
    Pass("select_kernels", select_kernels, "mux_graph", "kernel_plan", "pick adapter kernels, say why"),
)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its output is kept for dumps."""

    index: int
    name: str
    seconds: float
    summary: str
    output: Any = field(repr=False, compare=False)


@dataclass
class CompileContext:
    """Options plus facts passes leave for later ones and for `explain()`."""

    options: Options
    on_progress: Callable[[str, int, int, str], None] | None = None
    sharing: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # pass name -> what it did, for history

    def progress(self, stage: str, done: int, total: int, item: str) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total, item)


def _summary(value) -> str:
    if isinstance(value, list):
        return f"[{', '.join(repr(v) for v in value)}]"
    return repr(value)


def run_pipeline(tasks, ctx: CompileContext) -> tuple[dict[str, Any], list[PassRecord]]:
    """Run PIPELINE over ``tasks``; returns the final state and the pass history."""
    from muxc.verify import verify_state

    state: dict[str, Any] = {"tasks": tasks}
    history = []
    for i, p in enumerate(PIPELINE):
        t0 = time.perf_counter()
        state[p.writes] = p.fn(state[p.reads], ctx)
        seconds = time.perf_counter() - t0
        if ctx.options.verify:
            verify_state(p.name, state)
        summary = _summary(state[p.writes])
        if p.name in ctx.notes:
            summary = f"{ctx.notes[p.name]}; {summary}"
        history.append(PassRecord(i, p.name, seconds, summary, state[p.writes]))
    return state, history
