"""Pass `merge_backbones`: merge every task's graph into one `MuxGraph` on one backbone.

Contract. Input: TaskGraphs whose frozen bindings already point at shared tensors
(`share_frozen_weights`). Each task graph is reduced to its backbone (adapter nodes replaced by
the tensor they adapt); the backbones must be identical node for node (same ops, same frozen
tensors, same constants), else `ArchitectureMismatchError` names the first differing node.
Output: the first task's backbone, copied once, with

- one `OutputSite` after each base op that any task adapts on its output (LoRA, IA3 attention),
- one `InputSite` before each base op whose input any task scales (IA3 feed-forward),
- one `TaskLoss` node per task on its rows of the shared logits,
- one placeholder per parameter of an adapter the trace holds no node of (prefix tuning), for
  `rewrite_attention` to wire.

Does not mutate the task graphs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from muxc.errors import ArchitectureMismatchError, MuxcInternalError
from muxc.ir import AdapterRecord, MuxGraph, NodeInfo, Position, Role, TaskGraph, info, set_info
from muxc.ir import HeadLoss, InputSite, OutputSite, TaskLoss
from muxc.kinds import KINDS, spec_for_trace_op, spec_of
from muxc.passes.pass_base import CompileContext, PassResult

__all__ = ["merge_backbones"]

Key = tuple  # ("ph", fqn) for placeholders, ("n", i) for the i-th backbone op


@dataclass
class _Backbone:
    """A task graph seen through its backbone: ops in order, adapter nodes resolved away."""

    graph: TaskGraph
    calls: list[fx.Node]
    key: dict[fx.Node, Key]

    @staticmethod
    def of(tg: TaskGraph) -> _Backbone:
        calls, key = [], {}
        for node in tg.gm.graph.nodes:
            role = info(node).role
            if node.op == "placeholder" and role is not Role.ADAPTER_PARAM:
                key[node] = ("ph", info(node).fqn)
            elif node.op in ("call_function", "get_attr", "call_module", "call_method") and role is Role.BACKBONE:
                key[node] = ("n", len(calls))
                calls.append(node)
        return _Backbone(tg, calls, key)

    def resolve(self, node: fx.Node) -> fx.Node:
        """The backbone node an adapter node stands in for (its adapted tensor)."""
        while node.op == "call_function" and (spec := spec_for_trace_op(node.target)) is not None:
            node = node.args[spec.adapted_arg]
        return node

    def key_of(self, node: fx.Node) -> Key:
        node = self.resolve(node)
        if node not in self.key:
            raise MuxcInternalError(f"{self.graph.task}: {node.format_node()} is not a backbone node")
        return self.key[node]

    def signature(self, i: int):
        node = self.calls[i]
        return (node.op, node.target, self._canon(node.args), self._canon(node.kwargs))

    def _canon(self, a):
        if isinstance(a, fx.Node):
            return self.key_of(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._canon(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, self._canon(v)) for k, v in a.items()))
        return a


@dataclass
class _Anchor:
    """Where a task's adapter attaches on the shared backbone."""

    record: AdapterRecord
    at: Key  # OUT: the adapted op's output; IN: the consuming base op
    x: Key | None  # the tensor the adapter reads besides the anchor (LoRA: the base op's input)
    frozen: tuple[tuple[str, Key], ...] = ()  # frozen backbone tensors it reads (DoRA: weight, bias)
    head: bool = False  # a task head: ``at`` is the hidden state its loss reads


def _anchors(bb: _Backbone) -> list[_Anchor]:
    records = {(r.site, r.kind): r for r in bb.graph.adapters if spec_of(r.kind).traces}
    out = []
    for node in bb.graph.gm.graph.nodes:
        spec = spec_for_trace_op(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        site = node.args[-1]
        rec = records.get((site, spec.kind))
        if rec is None:
            raise MuxcInternalError(f"{bb.graph.task}: adapter node at {site!r} has no record")
        tensors = [t for t in spec.param_tensors(node.args) if t is not None]
        ph = [bb.graph.bindings[t.name].tensor for t in tensors]
        # a trained base tensor's placeholder is the frozen op's, now bound to its snapshot
        if not spec.trains_base and any(a is not b for a, b in zip(ph, rec.params.values())):
            raise MuxcInternalError(f"{bb.graph.task}: adapter tensors at {site!r} are not the model's")
        if spec.is_head:
            out.append(_Anchor(rec, bb.key_of(node.args[spec.adapted_arg]), None, head=True))
        elif rec.position is Position.IN:
            users = list(node.users)
            if len(users) != 1:
                raise MuxcInternalError(f"{bb.graph.task}: IA3 input at {site!r} has {len(users)} users")
            out.append(_Anchor(rec, bb.key_of(users[0]), bb.key_of(node.args[0])))
        else:
            x = None if spec.input_arg is None else bb.key_of(node.args[spec.input_arg])
            frozen = tuple((name, bb.key_of(t)) for name, t in
                           zip(spec.frozen_names, spec.frozen_tensors(node.args)) if t is not None)
            out.append(_Anchor(rec, bb.key_of(node.args[spec.adapted_arg]), x, frozen))
    if len(out) != len(records):
        raise MuxcInternalError(f"{bb.graph.task}: {len(records)} adapters but {len(out)} adapter nodes")
    return out


def _check_same(ref: _Backbone, other: _Backbone) -> None:
    """``other``'s backbone equals ``ref``'s; a task with its own head only needs to equal a
    prefix (it stops at the hidden state its head reads, where a causal LM goes on to its
    frozen LM head)."""
    a, b = ref.graph, other.graph
    n = len(other.calls) if other.graph.head is not None else len(ref.calls)
    if len(ref.calls) < len(other.calls) or n != len(other.calls):
        raise ArchitectureMismatchError(
            f"tasks {a.task!r} ({a.model_type}, {len(ref.calls)} backbone ops) and {b.task!r} "
            f"({b.model_type}, {len(other.calls)} backbone ops) have different backbones; all "
            "tasks must fine-tune the same base architecture and config"
        )
    for i in range(n):
        if ref.signature(i) != other.signature(i):
            raise ArchitectureMismatchError(
                f"tasks {a.task!r} and {b.task!r} differ at backbone op {i}: "
                f"{ref.calls[i].format_node()} vs {other.calls[i].format_node()}; all tasks must "
                "fine-tune the same base architecture and config"
            )


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def merge_backbones(graphs: tuple[TaskGraph, ...], ctx: CompileContext) -> PassResult[MuxGraph]:
    """Merge task graphs into a new MuxGraph on one backbone; does not mutate them (module doc)."""
    bbs = [_Backbone.of(g) for g in graphs]
    # the reference: the longest backbone (a task on the frozen LM head goes past the hidden
    # state that tasks with their own head stop at)
    ref = max(bbs, key=lambda bb: (len(bb.calls), bb.graph.head is None))
    for other in bbs:
        if other is not ref:
            _check_same(ref, other)
    tasks = tuple(g.task for g in graphs)
    everyone = frozenset(tasks)
    every = [a for bb in bbs for a in _anchors(bb)]
    anchors = [a for a in every if not a.head]
    heads = {a.record.task: a for a in every if a.head}
    out_sites: dict[Key, list[_Anchor]] = defaultdict(list)
    in_sites: dict[Key, list[_Anchor]] = defaultdict(list)
    for a in anchors:
        (in_sites if a.record.position is Position.IN else out_sites)[a.at].append(a)

    g = fx.Graph()
    env: dict[Key, fx.Node] = {}
    tensors = {}
    for node in ref.graph.gm.graph.find_nodes(op="placeholder"):
        rec = info(node)
        if rec.role is Role.FROZEN:
            new = g.placeholder(node.name)
            new.meta.update(node.meta)
            set_info(new, NodeInfo(Role.FROZEN, everyone, fqn=rec.fqn, sources=_sources(bbs, ("ph", rec.fqn))))
            env[("ph", rec.fqn)] = new
            tensors[node.name] = ref.graph.bindings[node.name].tensor
    param_nodes: dict[tuple[str, str], list[fx.Node]] = {}
    for a in every:
        r = a.record
        nodes = []
        for role, t in r.params.items():
            new = g.placeholder(_safe(f"{r.task}__{r.param_names[role]}"))
            new.meta["val"] = t
            set_info(new, NodeInfo(Role.ADAPTER_PARAM, frozenset({r.task}), fqn=r.param_names[role]))
            tensors[new.name] = t
            nodes.append(new)
        param_nodes[(r.task, r.site, r.kind)] = nodes
    for r in (r for tg in graphs for r in tg.adapters if not spec_of(r.kind).traces):
        for role, t in r.params.items():  # read by the attention rewrite (prefix tuning)
            new = g.placeholder(_safe(f"{r.task}__{r.param_names[role]}"))
            new.meta["val"] = t
            set_info(new, NodeInfo(Role.ADAPTER_PARAM, frozenset({r.task}), fqn=r.param_names[role]))
            tensors[new.name] = t
    for node in ref.graph.gm.graph.find_nodes(op="placeholder"):
        if info(node).role is Role.INPUT:
            new = g.placeholder(node.name)
            new.meta.update(node.meta)
            set_info(new, NodeInfo(Role.INPUT, everyone, sources=_sources(bbs, ("ph", None))))
            env[("ph", info(node).fqn)] = new
    mux = g.placeholder("mux")
    set_info(mux, NodeInfo(Role.INPUT, everyone))

    sites: dict[str, tuple[AdapterRecord, ...]] = {}

    def site_params(group):
        return [p for a in group for p in param_nodes[(a.record.task, a.record.site, a.record.kind)]]

    for i, node in enumerate(ref.calls):
        key = ("n", i)
        override = {}
        if key in in_sites:
            group = _ordered(in_sites[key], tasks)
            xkey = _one_key(group, "x")
            recs = tuple(a.record for a in group)
            site = g.create_node(
                "call_function",
                InputSite(recs[0].site, recs),
                (env[xkey], mux, *site_params(group)),
                name=_safe(f"in_site_{recs[0].site}"),
            )
            site.meta["val"] = env[xkey].meta.get("val")
            set_info(site, NodeInfo(Role.ADAPTER, frozenset(r.task for r in recs), site=recs[0].site, adapters=recs))
            sites[f"{recs[0].site}:in"] = recs
            override[xkey] = site
        new = g.node_copy(node, lambda n: override.get(ref.key_of(n)) or env[ref.key_of(n)])
        set_info(new, NodeInfo(Role.BACKBONE, everyone, sources=_sources(bbs, key)))
        env[key] = new
        if key in out_sites:
            group = _ordered(out_sites[key], tasks)
            xkey = _one_key(group, "x", default=key)  # IA3-only sites read no x: pass h
            recs = tuple(a.record for a in group)
            frozen = _frozen_of(group)
            site = g.create_node(
                "call_function",
                OutputSite(recs[0].site, recs, tuple(name for name, _ in frozen)),
                (env[xkey], new, mux, *(env[k] for _, k in frozen), *site_params(group)),
                name=_safe(f"site_{recs[0].site}"),
            )
            site.meta["val"] = new.meta.get("val")
            set_info(site, NodeInfo(Role.ADAPTER, frozenset(r.task for r in recs), site=recs[0].site, adapters=recs))
            sites[recs[0].site] = recs
            env[key] = site

    out_node = next(iter(ref.graph.gm.graph.find_nodes(op="output")))
    logits = env[ref.key_of(_first_node(out_node.args))]
    head_of = {tg.task: tg.head for tg in graphs}
    losses = []
    for t in tasks:
        if t in heads:
            a = heads[t]
            if head_of[t] is None:
                raise MuxcInternalError(f"task {t!r}: a head node but no head info")
            loss = g.create_node("call_function", HeadLoss(t, head_of[t]),
                                 (env[a.at], mux, *param_nodes[(t, a.record.site, a.record.kind)]), name=_safe(f"loss_{t}"))
        else:
            loss = g.create_node("call_function", TaskLoss(t), (logits, mux), name=_safe(f"loss_{t}"))
        set_info(loss, NodeInfo(Role.LOSS, frozenset({t})))
        losses.append(loss)
    out = g.output(tuple(losses))
    set_info(out, NodeInfo(Role.OUTPUT, everyone))
    g.lint()
    gm = fx.GraphModule(ref.graph.gm, g, class_name="MuxGraphModule")
    return PassResult(MuxGraph(
        gm=gm,
        tasks=tasks,
        tensors=tensors,
        model_type=ref.graph.model_type,
        sites=sites,
        adapters={tg.task: tuple(tg.adapters) for tg in graphs},
        heads={t: h for t, h in head_of.items() if h is not None},
    ))


def _ordered(group: list[_Anchor], tasks: tuple[str, ...]) -> list[_Anchor]:
    """By task, then (a task's bias and its LoRA at one site) by the kind table's order."""
    order = list(KINDS)
    return sorted(group, key=lambda a: (tasks.index(a.record.task), order.index(a.record.kind)))


def _one_key(group: list[_Anchor], what: str, default: Key | None = None) -> Key:
    keys = {getattr(a, what) for a in group} - {None}
    if not keys and default is not None:
        return default
    if len(keys) != 1:
        raise MuxcInternalError(f"site {group[0].record.site!r}: tasks disagree on the base op {what}")
    return keys.pop()


def _frozen_of(group: list[_Anchor]) -> tuple[tuple[str, Key], ...]:
    """The frozen tensors a site reads: every name its anchors read (DoRA: weight and bias, a
    trained bias: the bias), each once; anchors must agree on what a name is (one base op)."""
    out: dict[str, Key] = {}
    for a in group:
        for name, key in a.frozen:
            if out.setdefault(name, key) != key:
                raise MuxcInternalError(
                    f"site {group[0].record.site!r}: tasks disagree on the base op's {name}"
                )
    return tuple(out.items())


def _first_node(args) -> fx.Node:
    while isinstance(args, (list, tuple)):
        args = args[0]
    if not isinstance(args, fx.Node):
        raise MuxcInternalError("exported graph returns no logits node")
    return args


def _sources(bbs: list[_Backbone], key: Key) -> tuple[tuple[str, str], ...]:
    if key[0] == "n":
        return tuple((bb.graph.task, bb.calls[key[1]].name) for bb in bbs if key[1] < len(bb.calls))
    return ()
