"""The partitioned MuxGraph: subgraphs of three kinds, grouped into pipeline stages.

`muxc.passes.partition` builds a `PartitionedGraph` from a `MuxGraph`. Its pieces:

- `Subgraph`: a contiguous run of the merged graph's ops (in one topological order) of one
  `SubgraphKind`: ``COMPUTE`` (frozen ops), ``PEFT`` (one base op with every task's adapter
  sites at it) or ``COMMUNICATE`` (one transfer; for now a marker at each stage boundary naming
  the tensors that cross it). Ops are named by their node names in ``mux.gm``.
- `Stage`: a contiguous run of subgraphs, with a runnable ``fx.GraphModule`` cut out by
  ``torch.fx.passes.split_module``; ``inputs`` names what it is called with (placeholders of the
  merged graph or earlier stages' outputs), ``outputs`` what it returns.
- `run_stages(pg, *args)`: runs the stages one after another; it takes the merged graph's
  arguments and returns what ``mux.gm(*args)`` returns.

Placeholders (frozen weights, adapter parameters, ``input_ids``, ``attention_mask``,
``position_ids``, ``mux``) belong to no subgraph: every stage that reads one receives it as an
input. ``get_attr`` nodes (higher-order-op bodies) are copied into the stages that use them.

Not run as doctests (they need a compiled program; tests/test_partition.py runs them):

>>> pg = partition(program.mux, None, stages=2).value           # doctest: +SKIP
>>> pg                                                          # doctest: +SKIP
PartitionedGraph(llama, 2 stages, 18 subgraphs (9 compute, 8 peft, 1 communicate), stage cost 5.68e+07 / 5.77e+07 flop)
>>> run_stages(pg, *bound, input_ids, attention_mask, batch)   # doctest: +SKIP
(tensor(4.5393, grad_fn=<NllLossBackward0>), tensor(4.5941, grad_fn=<NllLossBackward0>))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch.fx as fx

from muxc.errors import MuxcInternalError
from muxc.ir.graph import MuxGraph
from muxc.ir.text import table

__all__ = [
    "SubgraphKind",
    "ShapeHint",
    "Crossing",
    "Subgraph",
    "Stage",
    "PartitionedGraph",
]


class SubgraphKind(str, Enum):
    """What a subgraph does (mechanism 5 of DESIGN.md)."""

    COMPUTE = "compute"  # a run of frozen, non-adapter ops
    PEFT = "peft"  # one base op with every task's adapters at it
    COMMUNICATE = "communicate"  # exactly one transfer or collective


@dataclass(frozen=True)
class ShapeHint:
    """The step shape used to turn symbolic sizes into numbers for costs and bytes.

    Every 2-D user input's first dim is taken as ``rows`` and its second as ``seq``; any other
    symbol counts as 1.

    >>> ShapeHint().tokens
    1024
    """

    rows: int = 4
    seq: int = 256

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


@dataclass(frozen=True)
class Crossing:
    """One value a stage sends to later stages.

    ``shape``: symbolic, as exported (e.g. ``(s72, s53, 32)``); ``bytes_per_token``: its size at
    the `ShapeHint` divided by the hint's tokens (a causal mask is quadratic in ``seq``, so its
    share grows with the sequence).
    """

    name: str
    shape: str
    dtype: str
    bytes_per_token: float


@dataclass(frozen=True)
class Subgraph:
    """One subgraph: its kind, stage, nodes (names in ``mux.gm``), owning tasks and cost.

    ``tasks``: the tasks with an adapter at a PEFT subgraph's base op; the tasks whose ops a
    COMPUTE subgraph runs (all tasks for the shared backbone, one for a task's loss); the tasks
    whose values a COMMUNICATE subgraph sends.
    ``cost`` is in the unit of the partition's node cost (FLOPs by default); a COMMUNICATE
    subgraph has no nodes, cost 0, and lists its ``crossing`` values sent from ``stage`` to
    ``dst_stage``. ``site`` is the adapted base op's module path for a PEFT subgraph.
    """

    id: int
    kind: SubgraphKind
    stage: int
    nodes: tuple[str, ...]
    tasks: frozenset[str]
    cost: float
    site: str | None = None
    crossing: tuple[Crossing, ...] = ()
    dst_stage: int | None = None

    @property
    def bytes_per_token(self) -> float:
        """Bytes sent per token of the step (COMMUNICATE only; 0 otherwise)."""
        return sum(c.bytes_per_token for c in self.crossing)

    def describe(self) -> str:
        """One short phrase: the site, the transfer, or the node range."""
        if self.kind is SubgraphKind.COMMUNICATE:
            return (f"stage {self.stage}->{self.dst_stage}: {len(self.crossing)} tensors, "
                    f"{self.bytes_per_token:.4g} B/token")
        if self.kind is SubgraphKind.PEFT:
            return f"{self.site}"
        return f"{self.nodes[0]} .. {self.nodes[-1]}" if len(self.nodes) > 1 else self.nodes[0]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a runnable module over a contiguous run of subgraphs.

    ``module(*(env[n] for n in inputs))`` returns the values named by ``outputs`` (a tuple
    when ``tuple_out``, else the single value). ``cost`` sums its subgraphs' costs.
    """

    index: int
    module: fx.GraphModule = field(repr=False, compare=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    subgraphs: tuple[int, ...]
    cost: float
    tuple_out: bool = True

    def run(self, env: dict[str, Any]) -> None:
        """Call the module on the values ``env`` names and add its outputs to ``env``."""
        missing = [n for n in self.inputs if n not in env]
        if missing:
            raise MuxcInternalError(f"stage {self.index}: inputs {missing[:5]} not computed yet")
        out = self.module(*(env[n] for n in self.inputs))
        if not self.tuple_out:
            out = (out,)
        if len(out) != len(self.outputs):
            raise MuxcInternalError(
                f"stage {self.index}: {len(out)} outputs for {len(self.outputs)} names"
            )
        env.update(zip(self.outputs, out))


@dataclass(frozen=True)
class _Ref:
    """A node of the merged graph's output structure, by name."""

    name: str


def _fill(template: Any, env: dict[str, Any]) -> Any:
    if isinstance(template, _Ref):
        return env[template.name]
    if isinstance(template, tuple):
        return tuple(_fill(t, env) for t in template)
    if isinstance(template, list):
        return [_fill(t, env) for t in template]
    if isinstance(template, dict):
        return {k: _fill(v, env) for k, v in template.items()}
    return template


def output_template(graph: fx.Graph) -> Any:
    """The output structure of ``graph`` with each node replaced by a reference to its name."""
    out = next(iter(graph.find_nodes(op="output")))
    return fx.node.map_aggregate(out.args[0], lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)


@dataclass(eq=False)
class PartitionedGraph:
    """A MuxGraph cut into subgraphs and stages (see module doc). Does not own ``mux``.

    ``split`` is the ``split_module`` result (its ``submod_<i>`` are the stage modules; calling
    it also equals ``mux.gm``). ``cost_name`` says what ``cost`` values measure.
    """

    mux: MuxGraph
    subgraphs: tuple[Subgraph, ...]
    stages: tuple[Stage, ...]
    split: fx.GraphModule = field(repr=False)
    hint: ShapeHint
    cost_name: str
    output: Any = field(repr=False)
    input_names: tuple[str, ...] = ()
    _where: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._where = {n: sg.id for sg in self.subgraphs for n in sg.nodes}

    def __repr__(self) -> str:
        counts = self.counts()
        kinds = ", ".join(f"{counts[k]} {k.value}" for k in SubgraphKind)
        sc = self.stage_costs()
        if len(sc) <= 4:
            costs = " / ".join(f"{c:.3g}" for c in sc)
        else:
            costs = f"max {max(sc):.3g}, mean {sum(sc) / len(sc):.3g}"
        return (f"PartitionedGraph({self.mux.model_type}, {len(self.stages)} stages, "
                f"{len(self.subgraphs)} subgraphs ({kinds}), stage cost {costs} {self.cost_name})")

    # ------------------------------------------------------------------ queries

    def counts(self) -> dict[SubgraphKind, int]:
        """Number of subgraphs of each kind."""
        out = dict.fromkeys(SubgraphKind, 0)
        for sg in self.subgraphs:
            out[sg.kind] += 1
        return out

    def of_kind(self, kind: SubgraphKind) -> list[Subgraph]:
        return [sg for sg in self.subgraphs if sg.kind is kind]

    def subgraph_of(self, node: str | fx.Node) -> Subgraph:
        """The subgraph holding ``node`` (a node of ``mux.gm`` or its name)."""
        name = node.name if isinstance(node, fx.Node) else node
        if name not in self._where:
            raise MuxcInternalError(
                f"node {name!r} is in no subgraph (placeholders, get_attr and output are not)"
            )
        return self.subgraphs[self._where[name]]

    def stage_of(self, node: str | fx.Node) -> int:
        return self.subgraph_of(node).stage

    def stage_costs(self) -> list[float]:
        return [s.cost for s in self.stages]

    def stage_inputs(self, index: int) -> dict[str, tuple[str, ...]]:
        """Stage ``index``'s inputs by origin, for an executor.

        ``bound``: tensors of ``mux.tensors`` (frozen weights, adapter parameters) the stage
        holds; ``data``: the step's inputs (``input_ids``, ..., ``mux``); ``received``: values
        computed by earlier stages (all listed in the previous COMMUNICATE record).
        """
        placeholders = set(self.input_names)
        names = self.stages[index].inputs
        return {
            "bound": tuple(n for n in names if n in self.mux.tensors),
            "data": tuple(n for n in names if n in placeholders and n not in self.mux.tensors),
            "received": tuple(n for n in names if n not in placeholders),
        }

    def boundaries(self) -> list[Subgraph]:
        """The COMMUNICATE subgraphs, one per stage boundary, in order."""
        return self.of_kind(SubgraphKind.COMMUNICATE)

    def edges(self) -> dict[tuple[int, int], tuple[str, ...]]:
        """Data flow between subgraphs: ``(src id, dst id) -> value names`` (sorted by id).

        A value used in a later stage flows through the COMMUNICATE subgraph of every boundary
        it crosses (producer -> boundary -> ... -> boundary -> consumer).
        """
        comm = {sg.stage: sg.id for sg in self.boundaries()}
        flows: dict[tuple[int, int], dict[str, None]] = defaultdict(dict)
        for node in self.mux.gm.graph.nodes:
            if node.name not in self._where:
                continue
            src = self.subgraphs[self._where[node.name]]
            for user in node.users:
                if user.name not in self._where:
                    continue
                dst = self.subgraphs[self._where[user.name]]
                if dst.id == src.id:
                    continue
                if dst.stage == src.stage:
                    flows[(src.id, dst.id)][node.name] = None
                    continue
                hops = [src.id, *(comm[s] for s in range(src.stage, dst.stage)), dst.id]
                for a, b in zip(hops, hops[1:]):
                    flows[(a, b)][node.name] = None
        return {k: tuple(v) for k, v in sorted(flows.items())}

    # ------------------------------------------------------------------ running

    def bind(self, *args: Any) -> dict[str, Any]:
        """The environment of a run: the merged graph's placeholder names -> ``args``."""
        if len(args) != len(self.input_names):
            raise MuxcInternalError(
                f"partitioned graph takes {len(self.input_names)} arguments like mux.gm, "
                f"got {len(args)}"
            )
        return dict(zip(self.input_names, args))

    def result(self, env: dict[str, Any]) -> Any:
        """What ``mux.gm`` returns, read from a run's environment."""
        return _fill(self.output, env)

    # ------------------------------------------------------------------ text

    def table(self) -> str:
        """A fixed-width table: one row per subgraph, then one per stage."""
        rows = []
        for sg in self.subgraphs:
            comm = sg.kind is SubgraphKind.COMMUNICATE
            stage = f"{sg.stage}->{sg.dst_stage}" if comm else str(sg.stage)
            cost = "-" if sg.kind is SubgraphKind.COMMUNICATE else f"{sg.cost:.3g}"
            first, last = (sg.nodes[0], sg.nodes[-1]) if sg.nodes else ("", "")
            note = sg.site or (sg.describe() if sg.kind is SubgraphKind.COMMUNICATE else "")
            rows.append([sg.id, sg.kind.value, stage, len(sg.nodes), ",".join(sorted(sg.tasks)),
                         cost, first, last, note])
        sub = table(["id", "kind", "stage", "nodes", "tasks", f"cost ({self.cost_name})", "first",
                     "last", "site / transfer"], rows, 48)
        srows = [[s.index, f"{s.subgraphs[0]}..{s.subgraphs[-1]}", f"{s.cost:.3g}", len(s.inputs),
                  len(s.outputs)] for s in self.stages]
        st = table(["stage", "subgraphs", f"cost ({self.cost_name})", "inputs", "outputs"], srows)
        return f"{self!r}\n\n{sub}\n\n{st}"

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)
