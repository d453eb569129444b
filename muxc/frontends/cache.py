"""`TraceCache`: export each task structure once per compile; equal tasks re-bind that export.

Exporting is most of a compile's time (seconds per task), yet N tenants of one base model
usually share one structure: same architecture and config, adapters of the same kinds, ranks,
scalings and targets (`TraceSignature`). For such a task the cache copies the earlier task's
graph and binds it to this task's own tensors, which is what exporting it would have given:

- the fx graph is copied node for node (same names, targets, arguments, and ``meta`` entries
  shallow-copied: the fake tensors and stack traces describe both tasks alike);
- every parameter/buffer placeholder is bound to the tensor with the same FQN in this task's
  model (`lifted_tensors`), so frozen weights and adapter parameters are the task's own;
- each adapter node reads this task's adapter parameters (adapters of one model are
  different placeholders of the same graph);
- node records (owning task, roles, provenance) are written afresh for this task.

An export is shared only when every placeholder it lifted is found again by FQN in the model
(a constant created during tracing cannot be re-bound) and its subgraph modules hold no tensors;
otherwise each such task is exported on its own.

What the cache keeps of a shareable export is a *template* (`TraceTemplates`): the graph and
its placeholders' kinds and FQNs, bound to no tensor (no frozen weight, no adapter parameter of
the task that was exported). A compile hands its templates on (`TraceTemplates`, one per
structure its tasks use); a later compile of the same program (`Program.add_task`,
``remove_task``) starts its cache from them, so a task of a known structure is re-bound, not
exported again.

>>> cache = TraceCache()                                                  # doctest: +SKIP
>>> graphs = [cache.trace(t, with_positions=False) for t in tasks]        # doctest: +SKIP
>>> cache.summary()                                                       # doctest: +SKIP
'2 exported, 2 re-bound to an equal-structure export'
>>> later = TraceCache(cache.templates())                                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.fx as fx

from muxc.errors import MuxcInternalError
from muxc.frontends.export import Export, bind_and_tag, export_task, lifted_tensors
from muxc.frontends.peft import (
    adapter_name_of,
    adapter_records,
    bias_mode,
    hf_model,
    prompt_encoder_of,
)
from muxc.frontends.signature import TraceSignature, trace_signature
from muxc.ir import Binding, BindingKind, TaskGraph
from muxc.kinds import spec_for_trace_op
from muxc.task import Task

__all__ = ["TraceCache", "TraceTemplates", "rebind"]

try:  # generates the graph's Python code on first use, not at construction (half a re-bind's
    # time; muxc only reads ``.graph`` of a task graph); public GraphModule where it is missing
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - torch without lazy graph modules
    _GraphModule = fx.GraphModule


class TraceTemplates:
    """The export templates a compile hands on, one per task structure (`TraceSignature`) its
    tasks use; read only. Each is an `Export` whose graph binds no tensor (module doc)."""

    def __init__(self, templates: Mapping[TraceSignature, Export]) -> None:
        self._templates = dict(templates)

    def get(self, sig: TraceSignature) -> Export | None:
        return self._templates.get(sig)

    def items(self):
        return self._templates.items()

    def __len__(self) -> int:
        return len(self._templates)

    def __repr__(self) -> str:
        nodes = sum(len(e.graph.gm.graph.nodes) for e in self._templates.values())
        return f"TraceTemplates({len(self)} structure(s), {nodes} nodes, no tensors)"


class TraceCache:
    """The exports of one compile by `TraceSignature` (module doc); `trace` is the entry point.

    ``kept``: templates an earlier compile handed on (`templates`); tasks of those structures
    are re-bound, not exported. ``exported`` lists the tasks exported, ``reused`` maps each
    other task to the task whose export it re-binds, and ``unshared`` maps an exported task to
    why its export could serve no other task.
    """

    def __init__(self, kept: TraceTemplates | None = None) -> None:
        self._exports: dict[TraceSignature, Export] = dict(kept.items()) if kept is not None else {}
        self._used: list[TraceSignature] = []
        self.exported: list[str] = []
        self.reused: dict[str, str] = {}
        self.unshared: dict[str, str] = {}

    def trace(self, task: Task, with_positions: bool) -> TaskGraph:
        """``task``'s `TaskGraph`: an earlier equal-structure export re-bound, else a new export."""
        sig = trace_signature(task, with_positions)
        hit = self._exports.get(sig)
        if hit is not None:
            self._used.append(sig)
            self.reused[task.name] = hit.graph.task
            return rebind(hit, task)
        exp = export_task(task, with_positions)
        self.exported.append(task.name)
        why = _unshareable(exp, task)
        if why is None:
            self._exports[sig] = _template(exp)
            self._used.append(sig)
        else:
            self.unshared[task.name] = why
        return exp.graph

    def templates(self) -> TraceTemplates:
        """The templates of the structures traced so far (exported here or kept), to hand on."""
        return TraceTemplates({sig: self._exports[sig] for sig in self._used})

    def summary(self) -> str:
        """How many tasks were exported and re-bound (and why an export was not shared)."""
        text = f"{len(self.exported)} exported, {len(self.reused)} re-bound to an equal-structure export"
        if self.unshared:
            task, why = next(iter(self.unshared.items()))
            text += f"; {len(self.unshared)} export(s) not shareable (task {task!r}: {why})"
        return text


def _template(exp: Export) -> Export:
    """``exp`` bound to no tensor: its graph, placeholder kinds and FQNs only (what `rebind`
    reads), so keeping it keeps none of the exported task's weights or adapter parameters."""
    bindings = {ph: Binding(b.kind, b.fqn) for ph, b in exp.graph.bindings.items()}
    return Export(replace(exp.graph, bindings=bindings, adapters=[]), exp.targets)


def rebind(source: Export, task: Task) -> TaskGraph:
    """``source``'s graph bound to ``task``'s tensors, as exporting ``task`` would give it.

    ``task`` must have ``source``'s `TraceSignature`. Does not mutate ``source`` or the model.
    """
    t0 = time.perf_counter()
    hf = hf_model(task.name, task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    records = adapter_records(task.name, hf, adapter, bias_mode(task.model, adapter), model=task.model)
    old = source.graph
    tensors = lifted_tensors(hf, source.targets.values(), _encoder(task))
    graph, env = _copy_graph(old.gm.graph)
    lifted = {}
    for ph, b in old.bindings.items():
        if b.kind is BindingKind.USER_INPUT:
            lifted[ph] = (b.kind, None)
            continue
        t = tensors[source.targets[ph]]
        if t is None:
            raise MuxcInternalError(
                f"task {task.name!r}: {source.targets[ph]} of {old.task!r}'s export is not in its model"
            )
        lifted[ph] = (b.kind, t)
    placeholder_of = {id(t): env[n] for n in old.gm.graph.find_nodes(op="placeholder")
                      if (t := lifted[n.name][1]) is not None}
    by_site = {(r.site, r.kind): r for r in records}
    for node in graph.nodes:
        spec = spec_for_trace_op(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        rec = by_site.get((node.args[-1], spec.kind))
        missing = rec is None or any(id(t) not in placeholder_of for t in rec.params.values())
        if missing:
            raise MuxcInternalError(
                f"task {task.name!r}: adapter node {node.format_node()} of {old.task!r}'s export has "
                "no matching adapter parameters in this task's model"
            )
        params = tuple(placeholder_of[id(t)] for t in rec.params.values())
        node.args = spec.with_params(node.args, params)
    graph.lint()
    gm = _GraphModule(old.gm, graph)
    gm.meta.update(old.gm.meta)
    tg = bind_and_tag(task, gm, records, lifted, source.targets)
    tg.trace_seconds = time.perf_counter() - t0
    tg.reused_from = old.task if old.task != task.name else None  # a kept template of itself
    return tg


def _encoder(task: Task) -> torch.nn.Module | None:
    """The task's prompt encoder (prompt tuning, P-tuning), whose parameters an export lifts."""
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    prompt = prompt_encoder_of(task.name, task.model, adapter)
    return None if prompt is None else prompt[1]


def _copy_graph(old: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A new graph with ``old``'s nodes (names kept, ``meta`` dicts shallow-copied)."""
    new = fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
    new.set_codegen(copy.deepcopy(old._codegen))
    env: dict[fx.Node, fx.Node] = {}
    for node in old.nodes:
        env[node] = new.node_copy(node, env.__getitem__)
    return new, env


def _unshareable(exp: Export, task: Task) -> str | None:
    """Why ``exp`` cannot be re-bound to another task (None: it can)."""
    hf = hf_model(task.name, task.model)
    found = lifted_tensors(hf, exp.targets.values(), _encoder(task))
    for ph, target in exp.targets.items():
        if found[target] is not exp.graph.bindings[ph].tensor:
            return f"{target} is not a tensor of the model (a constant made while tracing)"
    gm = exp.graph.gm
    for node in gm.graph.find_nodes(op="get_attr"):
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        holds = isinstance(obj, torch.nn.Module) and (
            next(obj.parameters(), None) is not None or next(obj.buffers(), None) is not None
        )
        if not isinstance(obj, torch.nn.Module) or holds:
            return f"graph attribute {node.target!r} holds tensors"
    return None
