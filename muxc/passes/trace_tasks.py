"""Pass `trace_tasks`: capture every task as a `TaskGraph`. Does not mutate the models."""

from __future__ import annotations

from collections.abc import Sequence

from muxc.frontends import TraceCache, TraceTemplates
from muxc.frontends.peft import adapter_name_of
from muxc.kinds.prefix import is_prefix
from muxc.ir import TaskGraph
from muxc.options import Alignment
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.task import Task

__all__ = ["trace_tasks"]


def trace_tasks(
    tasks: Sequence[Task], ctx: CompileContext
) -> PassResult[tuple[tuple[TaskGraph, ...], TraceTemplates]]:
    """One torch.export graph per task, adapters opaque, in task order; does not mutate the models.

    Tasks of equal structure (`muxc.frontends.TraceSignature`) share one export, re-bound to
    each task's own tensors; so do tasks of a structure in ``ctx.exports`` (templates an
    earlier compile handed on: nothing of theirs is exported again). Also returns the
    templates of the structures these tasks use, bound to no tensor, to hand on. The notes say
    how many tasks were exported and how many re-bound. With chunk alignment the graphs also
    take ``position_ids`` (positions restart per packed sample); so do they when a task does
    prefix tuning (its rows' positions start after its prefix: `muxc.runtime.positions`).
    """
    with_positions = ctx.options.alignment is Alignment.CHUNK or any(
        is_prefix(t.model, adapter_name_of(t.name, t.model, t.adapter_name)) for t in tasks
    )
    cache = TraceCache(ctx.exports)  # its task graphs are dropped when the pass returns
    graphs = []
    for i, task in enumerate(tasks):
        ctx.progress("trace", i, len(tasks), task.name)
        graphs.append(cache.trace(task, with_positions))
    ctx.progress("trace", len(tasks), len(tasks), "")
    return PassResult((tuple(graphs), cache.templates()), cache.summary())
