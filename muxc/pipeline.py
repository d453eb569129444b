"""The compiler as one readable list of passes, and the thin driver that runs it.

Each step reads one field of the typed `CompileState` and writes one or more. A pass is a
function ``(value, ctx) -> PassResult``; it returns new values and never mutates an earlier
pass's output. The driver times each pass, records ``(index, name, seconds, summary)`` and the
pass output's text (rendered right away, so a dump shows what the pass made, not what later
passes made of it) in the history, and, with ``Options(verify=True)``, runs the invariant
checks of `muxc.verify` after it.

>>> state, history = run_pipeline(tasks, CompileContext(Options()))      # doctest: +SKIP
>>> history[4].summary                                                   # doctest: +SKIP
"alignment='pad': attention left as exported; MuxGraph(llama, tasks=['a', 'b'], ...)"
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from muxc.dump import render
from muxc.errors import MuxcInternalError
from muxc.frontends import TraceTemplates
from muxc.frontends.garbage import collect_young, young_garbage
from muxc.frontends.release import forget_generated_code, generated_code_keys, release_export_state
from muxc.ir import MuxGraph, PartitionedGraph, TaskGraph
from muxc.ir.recompute import RecomputePlan
from muxc.passes import (
    fuse_lm_head_loss,
    fuse_swiglu,
    merge_backbones,
    native_gqa,
    partition,
    plan_recompute,
    replay_adapter_inputs,
    rewrite_attention,
    select_kernels,
    share_frozen_weights,
    trace_tasks,
    validate_tasks,
)
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.passes.select_kernels import KernelPlan
from muxc.passes.share_frozen_weights import SharingReport
from muxc.task import Task
from muxc.verify import verify_state

__all__ = ["Pass", "PIPELINE", "PassRecord", "CompileState", "CompileContext", "run_pipeline"]


@dataclass(frozen=True, kw_only=True)
class CompileState:
    """What the passes have produced so far; the driver replaces fields, passes never mutate.

    ``tasks`` is the user's input until `validate_tasks` turns it into a checked tuple.
    """

    tasks: Sequence[Task]
    task_graphs: tuple[TaskGraph, ...] = ()
    sharing: SharingReport | None = None
    mux_graph: MuxGraph | None = None
    partitioned: PartitionedGraph | None = None
    kernel_plan: KernelPlan | None = None
    exports: TraceTemplates | None = None  # one trace template per task structure, no tensors
    recompute: RecomputePlan | None = None


_FIELDS = frozenset(f.name for f in fields(CompileState))


@dataclass(frozen=True)
class Pass:
    """One pipeline step, named after ``fn``: it reads state field ``reads``, writes ``writes``.

    With several fields in ``writes``, ``fn``'s result value is a tuple of one value per field.
    """

    fn: Callable[[Any, CompileContext], PassResult]
    reads: str
    writes: str | tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        unknown = sorted({self.reads, *self.outputs} - _FIELDS)
        if unknown:
            raise MuxcInternalError(f"pass {self.name!r} names {unknown}, not CompileState fields")

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.writes,) if isinstance(self.writes, str) else self.writes


PIPELINE: tuple[Pass, ...] = (
    Pass(validate_tasks, "tasks", "tasks", "fail fast, before any tracing"),
    Pass(trace_tasks, "tasks", ("task_graphs", "exports"), "one export per structure, adapters opaque"),
    Pass(share_frozen_weights, "task_graphs", ("task_graphs", "sharing"), "one copy of the base"),
    Pass(merge_backbones, "task_graphs", "mux_graph", "each frozen op once for all tasks"),
    Pass(rewrite_attention, "mux_graph", "mux_graph", "chunks attend to kept K/V"),
    Pass(native_gqa, "mux_graph", "mux_graph", "grouped K/V heads read unrepeated"),
    Pass(fuse_swiglu, "mux_graph", "mux_graph", "silu(gate) * up keeps two tensors, not three"),
    Pass(fuse_lm_head_loss, "mux_graph", "mux_graph", "no tokens x vocab logits kept for backward"),
    Pass(replay_adapter_inputs, "mux_graph", "mux_graph", "adapters keep a cheap input's roots"),
    Pass(partition, "mux_graph", "partitioned", "subgraphs + cost-balanced pipeline stages"),
    Pass(select_kernels, "mux_graph", "kernel_plan", "pick adapter kernels, say why"),
    Pass(plan_recompute, "tasks", "recompute", "checkpointing the models ask for is kept"),
)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: ``summary`` is its notes and output's short form, ``text`` the long one.

    ``text`` is rendered when the pass finishes, so it shows exactly that pass's output. It is
    kept zlib-compressed (``packed``): the graph tables of a 12-layer model's passes are ~9 MiB
    of text a program would otherwise hold for its whole life, for dumps only.

    >>> PassRecord.of(0, "p", 0.1, "did p", "a long table").text
    'a long table'
    """

    index: int
    name: str
    seconds: float
    summary: str
    packed: bytes = field(default=b"", repr=False, compare=False)

    @staticmethod
    def of(index: int, name: str, seconds: float, summary: str, text: str) -> PassRecord:
        return PassRecord(index, name, seconds, summary, zlib.compress(text.encode(), 1))

    @property
    def text(self) -> str:
        return zlib.decompress(self.packed).decode() if self.packed else ""


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(repr(v) for v in value)}]"
    return repr(value)


def _values(p: Pass, result) -> tuple:
    """The values ``p`` writes, one per field of ``p.outputs``."""
    if not isinstance(result, PassResult):
        got = type(result).__name__
        raise MuxcInternalError(f"pass {p.name!r} returned {got}, not a PassResult")
    if len(p.outputs) == 1:
        return (result.value,)
    if not isinstance(result.value, tuple) or len(result.value) != len(p.outputs):
        raise MuxcInternalError(
            f"pass {p.name!r} writes {p.outputs}; its value must be a tuple of {len(p.outputs)}"
        )
    return result.value


def run_pipeline(tasks, ctx: CompileContext) -> tuple[CompileState, list[PassRecord]]:
    """Run PIPELINE over ``tasks``; returns the final state and the pass history.

    ``ctx.exports`` (trace templates of an earlier compile, e.g. `Program.add_task`'s) spares
    the structures it holds from being exported again; ``state.exports`` hands this compile's on.
    """
    state = CompileState(tasks=tasks)
    history = []
    sources = generated_code_keys()
    with young_garbage():  # each pass's dropped graphs freed before the next pass runs
        for i, p in enumerate(PIPELINE):
            t0 = time.perf_counter()
            result = p.fn(getattr(state, p.reads), ctx)
            seconds = time.perf_counter() - t0
            values = _values(p, result)
            state = replace(state, **dict(zip(p.outputs, values)))
            if ctx.options.verify:
                shared = state.sharing is not None
                verify_state(p.name, state.task_graphs, state.mux_graph, shared=shared)
            summary = "; ".join([*filter(None, [result.notes]), *(_short(v) for v in values)])
            text = "\n\n".join(render(v) for v in values)
            history.append(PassRecord.of(i, p.name, seconds, summary, text))
            del result, values
            collect_young()
    # passes that ran ops on fake tensors refilled torch's caches that tie the exports' shape
    # environments into cycles gc cannot free (muxc.frontends.release)
    kept = _graph_modules(state)
    release_export_state(kept)
    if state.partitioned is not None:
        kept.append(state.partitioned.split)
    forget_generated_code(sources, kept)  # torch.fx keeps every generated source for good
    return state, history


def _graph_modules(state: CompileState) -> list:
    """The fx graph modules of ``state`` whose node metadata hold the exports' fake tensors."""
    gms = [tg.gm for tg in state.task_graphs]
    if state.mux_graph is not None:
        gms.append(state.mux_graph.gm)
    if state.exports is not None:
        gms += [e.graph.gm for _, e in state.exports.items()]
    return gms
