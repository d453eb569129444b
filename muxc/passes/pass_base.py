"""What every pass takes and returns: `CompileContext` in, `PassResult` out.

A pass is a function ``fn(value, ctx) -> PassResult[T]``: ``value`` is the compile-state field
it reads, ``ctx`` carries the options and the progress callback, and the result holds the
value the driver writes into the state plus the pass's own one-line notes for the history.
Passes talk to later passes only through the values they return.

>>> PassResult(3, "made three")
PassResult(value=3, notes='made three')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch.fx as fx

from muxc.ir import MuxGraph, copy_graph
from muxc.options import Options

if TYPE_CHECKING:
    from muxc.frontends.cache import TraceTemplates

__all__ = ["CompileContext", "PassResult", "rewritable_copy"]

try:  # generates the graph's Python code when it is first called, not at every `recompile`: a
    # pass's graph module is rewritten and handed on, and only the last one ever runs
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - torch without lazy graph modules
    _GraphModule = fx.GraphModule

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult(Generic[T]):
    """A pass's output ``value`` and ``notes``: what it did, in words, for ``program.history``."""

    value: T
    notes: str = ""


@dataclass(frozen=True)
class CompileContext:
    """The compile's options and its progress callback; passes read it and never write it.

    ``exports``: the trace templates an earlier compile of the same program handed on
    (`muxc.frontends.TraceTemplates`); `trace_tasks` re-binds tasks of those structures.
    """

    options: Options
    on_progress: Callable[[str, int, int, str], None] | None = None
    exports: TraceTemplates | None = None

    def progress(self, stage: str, done: int, total: int, item: str) -> None:
        """Report ``done`` of ``total`` items of ``stage`` (e.g. tracing) to the callback."""
        if self.on_progress is not None:
            self.on_progress(stage, done, total, item)


def rewritable_copy(mux: MuxGraph) -> fx.GraphModule:
    """A graph module for a pass to rewrite in place of ``mux``'s: ``mux.gm``'s attributes
    shared, its graph copied node for node (`muxc.ir.copy_graph`), so the pass does not mutate
    its input."""
    graph, _ = copy_graph(mux.gm.graph)
    return _GraphModule(mux.gm, graph, class_name=type(mux.gm).__name__)
