"""Pass `trace_tasks`: capture every task as a `TaskGraph`. Does not mutate the models."""

from __future__ import annotations

from muxc.frontends import trace_task
from muxc.ir import TaskGraph
from muxc.task import Task

__all__ = ["trace_tasks"]


def trace_tasks(tasks: list[Task], ctx) -> list[TaskGraph]:
    """One torch.export graph per task, adapters as opaque nodes, in task order."""
    graphs = []
    for i, task in enumerate(tasks):
        ctx.progress("trace", i, len(tasks), task.name)
        graphs.append(trace_task(task))
    ctx.progress("trace", len(tasks), len(tasks), "")
    return graphs
