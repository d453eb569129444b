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

Templates also outlive a compile in one process: a bounded, process-wide store
(`SharedTemplates`, least recently used structure out first, `DEFAULT_SHARED_STRUCTURES`)
keeps the template of every structure exported, and a `TraceCache` that finds neither an
export of its own nor a kept template re-binds the stored one. So a service compiling several
programs over one base model, or a test suite compiling the same tiny structures file after
file, exports each structure once per process. The key is the complete `TraceSignature`
(model class and config, every tensor's metadata, every module's attributes, the adapter's
kinds, ranks, scalings, dropout and targets, the code traced, ``with_positions``), so a hit is
what exporting would give; a template binds no tensor and is never mutated (stored as a private
copy of the exported graph, copied again by every `rebind`). `clear_shared_templates` empties
the store, `set_shared_templates_size` bounds it (0 turns it off), `shared_templates` reads it;
``TraceCache(shared=None)`` ignores it. Memory: the graphs only (fake tensors, no storage),
measured in the README (Tests).

>>> cache = TraceCache()                                                  # doctest: +SKIP
>>> graphs = [cache.trace(t, with_positions=False) for t in tasks]        # doctest: +SKIP
>>> cache.summary()                                                       # doctest: +SKIP
'2 exported, 2 re-bound to an equal-structure export; template store: 2/8 structures'
>>> later = TraceCache(cache.templates())                                 # doctest: +SKIP
>>> clear_shared_templates()                                              # doctest: +SKIP
2
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from muxc.errors import MuxcInternalError
from muxc.frontends.export import Export, bind_and_tag, export_task, lifted_tensors
from muxc.frontends.garbage import collect_young
from muxc.frontends.peft import (
    adapter_name_of,
    adapter_records,
    bias_mode,
    hf_model,
    prompt_encoder_of,
)
from muxc.frontends.signature import TraceSignature, trace_signature
from muxc.ir import Binding, BindingKind, TaskGraph, copy_graph
from muxc.kinds import spec_for_trace_op
from muxc.task import Task

__all__ = [
    "TraceCache",
    "TraceTemplates",
    "SharedTemplates",
    "SharedTemplatesInfo",
    "DEFAULT_SHARED_STRUCTURES",
    "rebind",
    "shared_templates",
    "clear_shared_templates",
    "set_shared_templates_size",
]

# structures the process-wide store keeps; a template holds ~2.5-5 KiB of Python heap per fx
# node: 0.4-0.6 MiB for the 2-layer test models, ~6 MiB for a 12-layer Llama (README, add_task)
DEFAULT_SHARED_STRUCTURES = 8

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


@dataclass(frozen=True)
class SharedTemplatesInfo:
    """What a `SharedTemplates` holds now and how it served lookups since it was made."""

    structures: int  # templates held
    max_structures: int  # bound (0: the store is off)
    nodes: int  # fx nodes over all held graphs (their bodies included)
    hits: int  # lookups that found a template
    misses: int  # lookups that found none (the task was exported)
    evicted: int  # templates dropped to stay within the bound

    def __str__(self) -> str:
        if self.max_structures == 0:
            return "template store off"
        return f"template store: {self.structures}/{self.max_structures} structures"


class SharedTemplates:
    """A bounded store of trace templates by `TraceSignature`, least recently used out first;
    thread-safe. The process has one (`shared_templates`); `TraceCache` consults and fills it.

    A template put here must bind no tensor and is never mutated afterwards (`TraceCache`
    stores a private copy of each export's graph; `rebind` copies it again on every use).
    """

    def __init__(self, max_structures: int = DEFAULT_SHARED_STRUCTURES) -> None:
        self._lock = threading.Lock()
        self._templates: OrderedDict[TraceSignature, Export] = OrderedDict()
        self._max = _check_size(max_structures)
        self._hits = self._misses = self._evicted = 0

    def get(self, sig: TraceSignature) -> Export | None:
        """The template of ``sig``'s structure (now the most recently used), or None."""
        with self._lock:
            found = self._templates.get(sig)
            if found is None:
                self._misses += 1
                return None
            self._templates.move_to_end(sig)
            self._hits += 1
            return found

    def put(self, sig: TraceSignature, template: Export) -> None:
        """Keep ``template`` (bound to no tensor) for ``sig``; drops the least recently used
        structure past the bound. Keeps nothing while the store is off (bound 0)."""
        if any(b.tensor is not None for b in template.graph.bindings.values()) or template.graph.adapters:
            raise MuxcInternalError(f"the template of {template.graph.task!r}'s export binds tensors")
        with self._lock:
            if self._max == 0:
                return
            self._templates[sig] = template
            self._templates.move_to_end(sig)
            self._shrink()

    def resize(self, max_structures: int) -> None:
        """Bound the store to ``max_structures`` (0: off, and emptied); drops the least
        recently used structures past the new bound."""
        with self._lock:
            self._max = _check_size(max_structures)
            self._shrink()

    def clear(self) -> int:
        """Drop every template; returns how many there were. The counters start again."""
        with self._lock:
            n = len(self._templates)
            self._templates.clear()
            self._hits = self._misses = self._evicted = 0
            return n

    def items(self) -> list[tuple[TraceSignature, Export]]:
        """``(signature, template)`` of every structure held, least recently used first."""
        with self._lock:
            return list(self._templates.items())

    def info(self) -> SharedTemplatesInfo:
        with self._lock:
            nodes = sum(_node_count(e.graph.gm) for e in self._templates.values())
            return SharedTemplatesInfo(
                len(self._templates), self._max, nodes, self._hits, self._misses, self._evicted
            )

    def __len__(self) -> int:
        return len(self._templates)

    def __repr__(self) -> str:
        i = self.info()
        return (f"SharedTemplates({i.structures}/{i.max_structures} structures, {i.nodes} nodes, "
                f"{i.hits} hits, {i.misses} misses, {i.evicted} evicted, no tensors)")

    def _shrink(self) -> None:
        while len(self._templates) > self._max:
            self._templates.popitem(last=False)
            self._evicted += 1


def _check_size(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"max_structures must be an int >= 0 (0 turns the store off), got {n!r}")
    return n


def _node_count(gm: torch.nn.Module) -> int:
    return sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, fx.GraphModule))


_SHARED = SharedTemplates()  # the process-wide store (module doc)


def shared_templates() -> SharedTemplates:
    """The process-wide template store every `TraceCache` uses by default."""
    return _SHARED


def clear_shared_templates() -> int:
    """Empty the process-wide template store (the next compile of each structure exports it
    again); returns how many structures it held. Programs compiled earlier keep their own."""
    return _SHARED.clear()


def set_shared_templates_size(max_structures: int) -> None:
    """Bound the process-wide template store to ``max_structures`` structures (default
    `DEFAULT_SHARED_STRUCTURES`); 0 turns it off and empties it."""
    _SHARED.resize(max_structures)


class TraceCache:
    """The exports of one compile by `TraceSignature` (module doc); `trace` is the entry point.

    ``kept``: templates an earlier compile handed on (`templates`); tasks of those structures
    are re-bound, not exported. ``shared``: the store of templates that outlive a compile (the
    process-wide one by default; None: none), consulted after ``kept`` and filled with every
    shareable export. ``exported`` lists the tasks exported, ``reused`` maps each other task to
    the task whose export it re-binds, ``from_store`` each task re-bound from ``shared`` to the
    task (of an earlier compile) whose export that was, and ``unshared`` maps an exported task
    to why its export could serve no other task.
    """

    def __init__(
        self, kept: TraceTemplates | None = None, shared: SharedTemplates | None = _SHARED
    ) -> None:
        self._exports: dict[TraceSignature, Export] = dict(kept.items()) if kept is not None else {}
        self._shared = shared
        self._used: list[TraceSignature] = []
        self.exported: list[str] = []
        self.reused: dict[str, str] = {}
        self.from_store: dict[str, str] = {}
        self.unshared: dict[str, str] = {}

    def trace(self, task: Task, with_positions: bool) -> TaskGraph:
        """``task``'s `TaskGraph`: an earlier equal-structure export re-bound (of this compile,
        kept, or stored), else a new export (then stored)."""
        sig = trace_signature(task, with_positions)
        hit = self._exports.get(sig)
        if hit is None and self._shared is not None and (stored := self._shared.get(sig)) is not None:
            # this task stands for the structure in this compile: its graph is tabled in dumps
            # and the compile's later tasks of the structure re-bind "from" it
            hit = Export(replace(stored.graph, task=task.name), stored.targets)
            self._exports[sig] = hit
            self.from_store[task.name] = stored.graph.task
            self.reused[task.name] = stored.graph.task
            self._used.append(sig)
            return rebind(hit, task)
        if hit is not None:
            self._used.append(sig)
            self.reused[task.name] = hit.graph.task
            return rebind(hit, task)
        collect_young()  # what the tasks before left (a re-bind's copies)
        exp = export_task(task, with_positions)
        collect_young()  # what the export dropped: its tracers, fake modes, graphs of steps
        self.exported.append(task.name)
        why = _unshareable(exp, task)
        if why is None:
            template = _template(exp)
            self._exports[sig] = template
            self._used.append(sig)
            if self._shared is not None:
                self._shared.put(sig, template)
        else:
            self.unshared[task.name] = why
        return exp.graph

    def templates(self) -> TraceTemplates:
        """The templates of the structures traced so far (exported here or kept), to hand on."""
        return TraceTemplates({sig: self._exports[sig] for sig in self._used})

    def summary(self) -> str:
        """How many tasks were exported and re-bound (and why an export was not shared)."""
        text = f"{len(self.exported)} exported, {len(self.reused)} re-bound to an equal-structure export"
        if self.from_store:
            text += (f" ({len(self.from_store)} structure(s) from the process-wide store, exported"
                     " by an earlier compile)")
        if self.unshared:
            task, why = next(iter(self.unshared.items()))
            text += f"; {len(self.unshared)} export(s) not shareable (task {task!r}: {why})"
        if self._shared is not None:
            text += f"; {self._shared.info()}"
        return text


def _template(exp: Export) -> Export:
    """``exp`` bound to no tensor: a private copy of its graph (no pass that receives the
    exported graph can change the template), placeholder kinds and FQNs only (what `rebind`
    reads), so keeping it keeps none of the exported task's weights or adapter parameters."""
    bindings = {ph: Binding(b.kind, b.fqn) for ph, b in exp.graph.bindings.items()}
    gm, _ = _copy_module(exp.graph.gm)
    return Export(replace(exp.graph, gm=gm, bindings=bindings, adapters=[]), dict(exp.targets))


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
    gm, env = _copy_module(old.gm)
    graph = gm.graph
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
    tg = bind_and_tag(task, gm, records, lifted, source.targets)
    tg.trace_seconds = time.perf_counter() - t0
    tg.reused_from = old.task if old.task != task.name else None  # a kept template of itself
    return tg


def _encoder(task: Task) -> torch.nn.Module | None:
    """The task's prompt encoder (prompt tuning, P-tuning), whose parameters an export lifts."""
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    prompt = prompt_encoder_of(task.name, task.model, adapter)
    return None if prompt is None else prompt[1]


def _copy_module(old: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new graph module with a copy of ``old``'s graph (`muxc.ir.copy_graph`) and of each
    module a ``get_attr`` names (higher-order-op bodies, tensorless: `_unshareable`), so nothing
    done to one of them reaches the other; also the map from ``old``'s nodes to the copy's."""
    graph, env = copy_graph(old.graph)
    root = {}
    for node in old.graph.find_nodes(op="get_attr"):
        sub = old.get_submodule(node.target)
        root[node.target] = _copy_module(sub)[0] if isinstance(sub, fx.GraphModule) else copy.deepcopy(sub)
    gm = _GraphModule(root, graph)
    gm.meta.update(copy.copy(old.meta))
    return gm, env


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
