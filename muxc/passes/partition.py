"""Pass `partition`: cut a MuxGraph into COMPUTE/PEFT/COMMUNICATE subgraphs and pipeline stages.

Contract. Input: a `MuxGraph` (after `merge_backbones`, optionally `rewrite_attention`).
Output: a `PartitionedGraph` (see `muxc.ir.partition`). Does not mutate ``mux``: stage modules
are cut from a copy of its graph. Steps:

1. PEFT groups. Every adapter site (``Role.ADAPTER``) is grouped with its base op: for an
   output-side site, the op producing its ``h`` argument; for an input-side site, the op
   consuming it; views between the site and a GEMM (GPT-2's Conv1D is ``view(addmm(view))``)
   are followed to the GEMM and join the group (which ops are views and GEMMs:
   `muxc.ir.optable`). Sites sharing a base op (one task's IA3 on the input, another's LoRA
   on the output) form ONE group: "one base op with its adapters".
2. Order. A topological order of the ops in which each group is contiguous: the graph order,
   except that a group's members are pulled together (Kahn's algorithm over groups and single
   ops, ties broken by graph position, so the graph order is kept wherever it is valid) and the
   per-task LOSS nodes go last.
3. Subgraphs. Each group is a PEFT subgraph; each maximal run of other ops between groups is a
   COMPUTE subgraph. Cost = sum of ``node_cost`` over its nodes: a policy object from
   `muxc.plan.stage_cost` (default `FlopCost`; `LatencyCost` prices seconds) or any callable.
4. Stages. Contiguous runs of subgraphs minimising the largest stage cost (exact linear
   partition DP, deterministic). A stage is never cut inside a subgraph, and the LOSS nodes
   are in the last one. One COMMUNICATE subgraph is inserted at each boundary, naming the
   values (activations, sizes) that later stages read, with bytes per token.
5. Modules. ``split_module`` with the stage index as partition id: ids are non-decreasing
   along the order of step 2, hence monotone along every edge (no partition cycle).

Not run as doctests (they need a compiled program; tests/test_partition.py runs them):

>>> pg = partition(program.mux, None, stages=2).value       # doctest: +SKIP
>>> pg                                                      # doctest: +SKIP
PartitionedGraph(llama, 2 stages, 18 subgraphs (9 compute, 8 peft, 1 communicate), stage cost 5.68e+07 / 5.77e+07 flop)
>>> [sg.kind.value for sg in pg.subgraphs[:3]]              # doctest: +SKIP
['compute', 'peft', 'compute']
"""

from __future__ import annotations

import bisect
import heapq
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from muxc.errors import MuxcInternalError, OptionsError
from muxc.ir import MuxGraph, Position, Role, info
from muxc.ir.optable import is_gemm, is_view
from muxc.ir.partition import (
    Crossing,
    PartitionedGraph,
    ShapeHint,
    Stage,
    Subgraph,
    SubgraphKind,
    output_template,
)
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.ir.shapes import GraphShapes, SizesAt
from muxc.plan.stage_cost import FlopCost

__all__ = ["partition", "balance", "partition_ids"]


# ---------------------------------------------------------------------------- PEFT groups


@dataclass
class _Group:
    """A base op with its sites and the reshapes joining them, in graph order."""

    base: fx.Node
    members: list[fx.Node]
    site: str


def _walk_to_gemm(start: fx.Node, step: Callable[[fx.Node], fx.Node | None]) -> list[fx.Node]:
    """``[start, ...]`` through single-use reshapes up to a GEMM; ``[start]`` if none is found."""
    chain = [start]
    node = start
    while is_view(node):
        nxt = step(node)
        if nxt is None:
            return [start]
        chain.append(nxt)
        node = nxt
    return chain if is_gemm(node) else [start]


def _backward(node: fx.Node) -> fx.Node | None:
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_function" and len(src.users) == 1:
        return src
    return None


def _forward(node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.op == "call_function" else None


def _peft_groups(mux: MuxGraph) -> list[_Group]:
    by_base: dict[fx.Node, _Group] = {}
    owner: dict[fx.Node, fx.Node] = {}
    for site in mux.nodes_with(Role.ADAPTER):
        rec = info(site)
        if not rec.adapters:
            raise MuxcInternalError(f"adapter node {site.format_node()} has no adapter records")
        if rec.adapters[0].position is Position.OUT:
            h = site.args[1]
            if not isinstance(h, fx.Node) or h.op != "call_function":
                raise MuxcInternalError(
                    f"output site {site.format_node()}: its base output is not an op"
                )
            chain = _walk_to_gemm(h, _backward) if len(h.users) == 1 else [h]
        else:
            users = list(site.users)
            if len(users) != 1 or users[0].op != "call_function":
                raise MuxcInternalError(
                    f"input site {site.format_node()} feeds {len(users)} ops, not one base op"
                )
            chain = _walk_to_gemm(users[0], _forward)
        base = chain[-1]
        if base.meta.get("muxc") is None or info(base).role is not Role.BACKBONE:
            raise MuxcInternalError(
                f"site {rec.site!r}: base op {base.format_node()} is not a backbone op"
            )
        group = by_base.setdefault(base, _Group(base, [], rec.site or base.name))
        for n in (site, *chain):
            if owner.setdefault(n, base) is not base:
                raise MuxcInternalError(f"node {n.format_node()} belongs to two adapted base ops")
            if n not in group.members:
                group.members.append(n)
    pos = {n: i for i, n in enumerate(mux.gm.graph.nodes)}
    for g in by_base.values():
        g.members.sort(key=pos.__getitem__)
    return sorted(by_base.values(), key=lambda g: pos[g.members[0]])


def _ordered_units(mux: MuxGraph, groups: list[_Group]) -> list[tuple[list[fx.Node], _Group | None]]:
    """Ops in a topological order where each PEFT group is contiguous and losses come last."""
    ops = [n for n in mux.gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    pos = {n: i for i, n in enumerate(ops)}
    unit_of: dict[fx.Node, int] = {}
    units: list[tuple[list[fx.Node], _Group | None]] = []
    for g in groups:
        for n in g.members:
            unit_of[n] = len(units)
        units.append((g.members, g))
    for n in ops:
        if n not in unit_of:
            unit_of[n] = len(units)
            units.append(([n], None))
    deps: list[set[int]] = [set() for _ in units]
    users: list[set[int]] = [set() for _ in units]
    for n in ops:
        u = unit_of[n]
        for a in n.all_input_nodes:
            if a in unit_of and unit_of[a] != u:
                deps[u].add(unit_of[a])
                users[unit_of[a]].add(u)

    def key(u: int) -> tuple[int, int]:
        nodes = units[u][0]
        last = all(info(n).role is Role.LOSS for n in nodes)
        return (int(last), min(pos[n] for n in nodes))

    waiting = [len(d) for d in deps]
    heap = [(key(u), u) for u in range(len(units)) if waiting[u] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, u = heapq.heappop(heap)
        order.append(units[u])
        for v in sorted(users[u]):
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(heap, (key(v), v))
    if len(order) != len(units):
        stuck = [units[u][1].site for u in range(len(units)) if waiting[u] and units[u][1] is not None]
        raise MuxcInternalError(
            f"cannot make PEFT groups contiguous: grouping {stuck[:3]} with their base ops "
            "creates a cycle"
        )
    return order


# ---------------------------------------------------------------------------- balancing


def balance(costs: Sequence[float], parts: int) -> list[int]:
    """Stage index of each item: contiguous, non-empty parts minimising the largest part sum.

    Exact linear-partition DP, O(parts * n * log n): the best last cut for ``i`` items is where
    the (non-decreasing) best cost of the prefix meets the (non-increasing) cost of the last
    part. Deterministic: among equal maxima each last cut is the earliest.

    >>> balance([1, 1, 1, 1, 4], 2)
    [0, 0, 0, 0, 1]
    >>> balance([3, 1, 1, 1, 2, 2], 3)
    [0, 1, 1, 1, 2, 2]
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise MuxcInternalError(f"balance: {parts} parts for {n} items")
    if any(c < 0 for c in costs):
        raise MuxcInternalError("balance: negative cost")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for j in range(1, parts + 1):
        prev = best[j - 1]
        for i in range(j, n - (parts - j) + 1):
            if j == 1:
                best[1][i], cut[1][i] = prefix[i], 0
                continue
            lo, hi = j - 1, i - 1  # the last part is items t..i-1
            # smallest t in [lo, hi] with prev[t] >= prefix[i] - prefix[t]
            t = bisect.bisect_left(range(lo, hi + 1), True,
                                   key=lambda s: prev[s] >= prefix[i] - prefix[s]) + lo
            cands = [s for s in (t - 1, t) if lo <= s <= hi]
            val, s = min((max(prev[s], prefix[i] - prefix[s]), s) for s in cands)
            best[j][i], cut[j][i] = val, s
    out = [0] * n
    i = n
    for j in range(parts, 0, -1):
        t = cut[j][i]
        for k in range(t, i):
            out[k] = j - 1
        i = t
    return out


# ---------------------------------------------------------------------------- the pass


@dataclass
class _Piece:
    """A subgraph before stage assignment."""

    kind: SubgraphKind
    nodes: list[fx.Node]
    site: str | None = None


def _pieces(units: list[tuple[list[fx.Node], _Group | None]]) -> list[_Piece]:
    out: list[_Piece] = []
    for nodes, group in units:
        if group is not None:
            out.append(_Piece(SubgraphKind.PEFT, list(nodes), group.site))
        elif out and out[-1].kind is SubgraphKind.COMPUTE:
            out[-1].nodes.extend(nodes)
        else:
            out.append(_Piece(SubgraphKind.COMPUTE, list(nodes)))
    return out


def _tasks(nodes) -> frozenset[str]:
    tasks: set[str] = set()
    for n in nodes:
        rec = n.meta.get("muxc")
        if rec is not None:
            tasks |= rec.tasks
    return frozenset(tasks)


def _shape_str(val) -> str:
    if isinstance(val, torch.Tensor):
        return "(" + ", ".join(str(d) for d in val.shape) + ("," if val.dim() == 1 else "") + ")"
    if isinstance(val, (tuple, list)):
        return "[" + ", ".join(_shape_str(v) for v in val) + "]"
    return "scalar"


def _dtype_str(val) -> str:
    if isinstance(val, torch.Tensor):
        return str(val.dtype).removeprefix("torch.")
    if isinstance(val, (tuple, list)):
        return ",".join(sorted({_dtype_str(v) for v in val}))
    return type(val).__name__ if val is not None else "?"


def _crossings(order: list[fx.Node], stage_of: dict[fx.Node, int], boundary: int,
               sizes: SizesAt, tokens: int) -> tuple[tuple[Crossing, ...], frozenset[str]]:
    """Values computed in stages <= boundary that a later stage reads."""
    out, tasks = [], set()
    for n in order:
        if stage_of[n] > boundary:
            break
        if any(stage_of.get(u, -1) > boundary for u in n.users if u.op != "output"):
            val = n.meta.get("val")
            out.append(Crossing(n.name, _shape_str(val), _dtype_str(val), sizes.nbytes(val) / tokens))
            tasks |= _tasks([n])
    return tuple(out), frozenset(tasks)


def partition_ids(pg: PartitionedGraph) -> dict[str, int]:
    """Node name -> stage index for every op of ``pg.mux.gm`` (the split_module callback)."""
    return {n: sg.stage for sg in pg.subgraphs for n in sg.nodes}


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (split_module tags the nodes it reads)."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    copy = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    if [n.name for n in copy.graph.nodes] != [n.name for n in gm.graph.nodes]:
        raise MuxcInternalError("copying the merged graph renamed nodes")
    return copy


def _split(
    gm: fx.GraphModule, stage_of: dict[str, int], count: int
) -> tuple[fx.GraphModule, list[str]]:
    """``split_module`` by stage; returns the root and the attribute name of each stage module.

    Exported graphs already own ``submod_<i>`` attributes (higher-order-op bodies), so stage
    modules are named ``submod_stage_<i>`` (or, on a torch without ``partition_affix``, numbered
    past every existing ``submod_<i>``) to keep the two apart.
    """
    taken = {name for name, _ in gm.named_children()}
    if "partition_affix" in inspect.signature(split_module).parameters:
        names = [f"submod_stage_{i}" for i in range(count)]
        kwargs: dict = {"partition_affix": "stage"}
        offset = 0
    else:
        used = [int(n[7:]) for n in taken if n.startswith("submod_") and n[7:].isdigit()]
        offset = 1 + max(used, default=-1)
        names = [f"submod_{offset + i}" for i in range(count)]
        kwargs = {}
    if taken & set(names):
        raise MuxcInternalError(f"stage module names {sorted(taken & set(names))} already used")
    split = split_module(
        gm, gm, lambda n: stage_of[n.name] + offset, keep_original_node_name=True, **kwargs
    )
    return split, names


def _stages(
    split: fx.GraphModule, names: list[str], subgraphs: list[Subgraph], known: set[str]
) -> tuple[Stage, ...]:
    out = []
    for i, attr in enumerate(names):
        mod = getattr(split, attr, None)
        if not isinstance(mod, fx.GraphModule):
            raise MuxcInternalError(f"split_module made no module for stage {i}")
        inputs = tuple(n.name for n in mod.graph.find_nodes(op="placeholder"))
        ret = next(iter(mod.graph.find_nodes(op="output"))).args[0]
        tuple_out = isinstance(ret, (tuple, list))
        outputs = tuple(n.name for n in (ret if tuple_out else (ret,)))
        unknown = [n for n in (*inputs, *outputs) if n not in known]
        if unknown:
            raise MuxcInternalError(f"stage {i} names values {unknown[:3]} not in the merged graph")
        mine = [sg for sg in subgraphs if sg.stage == i]
        out.append(Stage(
            index=i, module=mod, inputs=inputs, outputs=outputs,
            subgraphs=tuple(sg.id for sg in mine),
            cost=sum(sg.cost for sg in mine if sg.kind is not SubgraphKind.COMMUNICATE),
            tuple_out=tuple_out,
        ))
    return tuple(out)


def partition(
    mux: MuxGraph,
    ctx: CompileContext | None = None,
    stages: int | None = None,
    node_cost: Callable[[fx.Node], float] | None = None,
    *,
    hint: ShapeHint | None = None,
) -> PassResult[PartitionedGraph]:
    """Cut ``mux`` into subgraphs and balanced pipeline stages; does not mutate it (module doc).

    ``stages`` defaults to ``ctx.options.stages`` (1 when absent). ``node_cost(node)`` prices an
    op of ``mux.gm`` (default `muxc.plan.stage_cost.FlopCost` at ``hint``; its ``name``
    attribute, if any, is the unit tables print); ``hint`` also sizes the COMMUNICATE records.
    Raises `OptionsError` unless ``1 <= stages <= number of subgraphs``.
    """
    if stages is None:
        stages = ctx.options.stages if ctx is not None else 1
    if isinstance(stages, bool) or not isinstance(stages, int):
        raise OptionsError(f"stages must be an int >= 1 (e.g. stages=2), got {stages!r}")
    hint = hint or ShapeHint()
    cost_fn = node_cost if node_cost is not None else FlopCost(mux, hint)
    cost_name = getattr(cost_fn, "name", "cost") if node_cost is not None else FlopCost.name

    groups = _peft_groups(mux)
    units = _ordered_units(mux, groups)
    pieces = _pieces(units)
    if not 1 <= stages <= len(pieces):
        n_peft = sum(p.kind is SubgraphKind.PEFT for p in pieces)
        raise OptionsError(
            f"stages={stages} but the {mux.model_type} graph has {len(pieces)} subgraphs "
            f"({n_peft} PEFT, {len(pieces) - n_peft} COMPUTE) to spread over stages; use "
            f"1 <= stages <= {len(pieces)} (a stage is never cut inside a subgraph)"
        )
    costs = []
    for p in pieces:
        c = 0.0
        for n in p.nodes:
            v = float(cost_fn(n))
            if not math.isfinite(v) or v < 0:
                raise OptionsError(
                    f"node_cost returned {v} for {n.format_node()}; costs must be finite and >= 0"
                )
            c += v
        costs.append(c)
    assign = balance(costs, stages)

    order = [n for p in pieces for n in p.nodes]
    stage_of = {n: assign[i] for i, p in enumerate(pieces) for n in p.nodes}
    sizes = GraphShapes(mux).at(hint)
    subgraphs: list[Subgraph] = []
    for i, p in enumerate(pieces):
        subgraphs.append(Subgraph(
            id=len(subgraphs), kind=p.kind, stage=assign[i], nodes=tuple(n.name for n in p.nodes),
            tasks=_tasks([n for n in p.nodes if info(n).role is Role.ADAPTER] if p.site else p.nodes),
            cost=costs[i], site=p.site,
        ))
        if i + 1 < len(pieces) and assign[i + 1] != assign[i]:
            crossing, tasks = _crossings(order, stage_of, assign[i], sizes, hint.tokens)
            subgraphs.append(Subgraph(
                id=len(subgraphs), kind=SubgraphKind.COMMUNICATE, stage=assign[i], nodes=(),
                tasks=tasks, cost=0.0, crossing=crossing, dst_stage=assign[i + 1],
            ))

    copy = _copy(mux.gm)
    split, names = _split(copy, {n.name: s for n, s in stage_of.items()}, stages)
    known = {n.name for n in mux.gm.graph.nodes}
    pg = PartitionedGraph(
        mux=mux,
        subgraphs=tuple(subgraphs),
        stages=_stages(split, names, subgraphs, known),
        split=split,
        hint=hint,
        cost_name=cost_name,
        output=output_template(mux.gm.graph),
        input_names=tuple(mux.input_names()),
    )
    _check(pg, order)
    notes = (
        f"{len(groups)} PEFT groups for {len(mux.nodes_with(Role.ADAPTER))} sites; "
        f"{stages} stages, max/mean cost {_imbalance(pg):.3f}"
    )
    return PassResult(pg, notes)


def _imbalance(pg: PartitionedGraph) -> float:
    costs = pg.stage_costs()
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0


def _check(pg: PartitionedGraph, order: list[fx.Node]) -> None:
    """Invariants: every op in one subgraph; stages monotone along edges; losses last."""
    ops = [n for n in pg.mux.gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    names = [n for sg in pg.subgraphs for n in sg.nodes]
    if sorted(names) != sorted(n.name for n in ops):
        raise MuxcInternalError("partition: subgraphs do not cover every op exactly once")
    stage = partition_ids(pg)
    for n in ops:
        for a in n.all_input_nodes:
            if a.name in stage and stage[a.name] > stage[n.name]:
                raise MuxcInternalError(
                    f"partition: edge {a.name} (stage {stage[a.name]}) -> {n.name} "
                    f"(stage {stage[n.name]})"
                )
    last = len(pg.stages) - 1
    for n in ops:
        if info(n).role is Role.LOSS and stage[n.name] != last:
            raise MuxcInternalError(f"partition: loss {n.name} in stage {stage[n.name]}, not {last}")
    if [n.name for n in order] != names:
        raise MuxcInternalError("partition: subgraphs are not in the partition order")
