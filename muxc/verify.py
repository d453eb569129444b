"""Invariant checks run after every pass when ``Options(verify=True)`` (always in tests).

A failed check is a muxc bug, raised as `MuxcInternalError` naming the pass and the node.
"""

from __future__ import annotations

from collections.abc import Sequence

from muxc.errors import MuxcInternalError
from muxc.ir import META_KEY, MuxGraph, Role, TaskGraph, info
from muxc.kinds import spec_of

__all__ = ["verify_state", "verify_task_graph", "verify_mux_graph"]


def _fail(pass_name: str, msg: str) -> None:
    raise MuxcInternalError(f"after pass {pass_name!r}: {msg}")


def verify_task_graph(pass_name: str, tg: TaskGraph) -> None:
    tg.gm.graph.lint()
    for node in tg.gm.graph.nodes:
        if META_KEY not in node.meta:
            _fail(pass_name, f"{tg.task}: {node.format_node()} has no muxc record")
    n_adapters = sum(1 for n in tg.gm.graph.nodes if info(n).role is Role.ADAPTER)
    traced = sum(1 for r in tg.adapters if spec_of(r.kind).traces)  # prefix tuning has no node
    if n_adapters != traced:
        _fail(pass_name, f"{tg.task}: {n_adapters} adapter nodes for {traced} adapters")


def verify_mux_graph(pass_name: str, mux: MuxGraph) -> None:
    g = mux.gm.graph
    g.lint()
    owner: dict[int, str] = {}
    for node in g.nodes:
        rec = info(node)
        if rec.role is Role.ADAPTER_PARAM:
            if len(rec.tasks) != 1:
                _fail(pass_name, f"adapter param {node.name} owned by {sorted(rec.tasks)}")
            t = mux.tensors[node.name]
            if id(t) in owner:
                _fail(pass_name, f"adapter tensor {node.name} also bound for task {owner[id(t)]}")
            owner[id(t)] = next(iter(rec.tasks))
        if rec.role is Role.ADAPTER:
            # one record per (task, kind): a task may hold a trained bias and LoRA at one site
            kinds = [(r.task, r.kind) for r in rec.adapters]
            if len(set(kinds)) != len(kinds):
                tasks = [r.task for r in rec.adapters]
                _fail(pass_name, f"site {rec.site} serves a task twice: {tasks}")
    frozen = [mux.tensors[n.name] for n in g.find_nodes(op="placeholder") if info(n).role is Role.FROZEN]
    if any(id(t) in owner for t in frozen):
        _fail(pass_name, "a frozen placeholder is bound to an adapter tensor")
    losses = [n for n in g.nodes if info(n).role is Role.LOSS]
    if len(losses) != len(mux.tasks):
        _fail(pass_name, f"{len(losses)} loss nodes for {len(mux.tasks)} tasks")


def verify_state(
    pass_name: str, task_graphs: Sequence[TaskGraph], mux_graph: MuxGraph | None, *, shared: bool
) -> None:
    """Check every IR of the compile state so far (the pipeline passes its fields).

    ``shared``: `share_frozen_weights` has run, so every task's frozen bindings must be the
    first task's tensors.
    """
    for tg in task_graphs:
        verify_task_graph(pass_name, tg)
    if shared and task_graphs:
        ref = {b.fqn: b.tensor for b in task_graphs[0].frozen_bindings().values()}
        for tg in task_graphs[1:]:
            for b in tg.frozen_bindings().values():
                ref.setdefault(b.fqn, b.tensor)  # tasks with their own head lack the LM head
                if b.tensor is not ref[b.fqn]:
                    _fail(pass_name, f"{tg.task}: {b.fqn} is not the shared tensor")
    if mux_graph is not None:
        verify_mux_graph(pass_name, mux_graph)
