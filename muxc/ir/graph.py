"""muxc's intermediate representations and the one typed record every node carries.

- `TaskGraph`: one task captured by torch.export; adapters are opaque nodes.
- `MuxGraph`: all tasks merged on one backbone; each adapted base op has one multi-task
  *site* node serving every task's adapter, and each task has its own loss node.

Facts muxc adds to an fx node live in ``node.meta["muxc"]``, a frozen `NodeInfo`, read with
`info(node)` and written with `set_info(node, ...)`. Adapters are described in one unified form,
`AdapterRecord` (base op, kind, dispatch, aggregate, params, scaling), so new PEFT types slot in
as new kinds without new node types.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.fx as fx

from muxc.errors import MuxcInternalError

__all__ = [
    "Role",
    "AdapterKind",
    "Dispatch",
    "Aggregate",
    "Position",
    "AdapterRecord",
    "NodeInfo",
    "Binding",
    "BindingKind",
    "TaskGraph",
    "MuxGraph",
    "info",
    "copy_graph",
    "set_info",
]

META_KEY = "muxc"


class Role(str, Enum):
    """What a node is for."""

    INPUT = "input"  # user data (input_ids, attention_mask) or the runtime context
    FROZEN = "frozen"  # a frozen weight/buffer shared by all tasks
    BACKBONE = "backbone"  # a frozen op shared by all tasks
    ADAPTER_PARAM = "adapter_param"  # a trainable tensor owned by one task
    ADAPTER = "adapter"  # applies adapters (one task in a TaskGraph, many in a MuxGraph)
    LOSS = "loss"  # a per-task head/loss
    OUTPUT = "output"


class AdapterKind(str, Enum):
    LORA = "lora"
    IA3 = "ia3"
    DORA = "dora"
    HEAD = "head"  # a task's own trainable head (modules_to_save of the output Linear)
    BIAS = "bias"  # a task's own trained copy of a base op's bias (LoRA bias="all"/"lora_only")
    PREFIX = "prefix"  # prefix tuning: trained K/V prepended at every attention (`muxc.ir.prefix`)
    PROMPT = "prompt"  # prompt tuning: learned virtual tokens in front of each row
    P_TUNING = "p_tuning"  # P-tuning: virtual tokens from an MLP/LSTM prompt encoder
    COPY = "copy"  # a task's own trainable copy of a backbone module (modules_to_save off the head)


class Dispatch(str, Enum):
    """Which tensor the adapter reads."""

    PARALLEL = "parallel"  # the base op's input x (LoRA: base(x) and B(A(x)))
    OUTPUT = "output"  # the base op's output h (IA3 on attention: h * v)
    PRE = "pre"  # the base op's input, and the adapter's output feeds the base op (IA3 ff)
    ATTENTION = "attention"  # the attention's keys and values (prefix tuning)


class Aggregate(str, Enum):
    """How adapter and base results combine."""

    ADD_SCALED = "base + s*B(A(x))"
    SCALE_OUTPUT = "base(x) * v"
    SCALE_INPUT = "base(x * v)"
    DORA = "base + (m/||W+sBA|| - 1)*(base - b) + m/||W+sBA|| * s*B(A(x))"
    ADD_BIAS = "base + (b_task - b_shared)"
    REPLACE = "copy(x)"  # the task's own copy of the module replaces it (modules_to_save)
    PREFIX_KV = "attn(q, [P_k; K], [P_v; V])"  # prefix tuning
    VIRTUAL_TOKENS = "h[pos < n] = encoder()[pos]"  # virtual tokens' embeddings (prompt tuning)


class Position(str, Enum):
    """Where a site sits relative to its base op."""

    OUT = "out"  # after the base op, combining with its result
    IN = "in"  # before the base op, rewriting its input


@dataclass(frozen=True)
class AdapterRecord:
    """One task's adapter at one base op, in the unified PEFT form.

    ``params`` maps a role ("A", "B", "v") to the user's own trainable tensor (shared by
    identity, so gradients land on the user's parameters); ``param_names`` gives its FQN in
    the user's model.
    """

    task: str
    site: str  # module path of the base op, relative to the HF model (e.g. model.layers.0.mlp.up_proj)
    kind: AdapterKind
    dispatch: Dispatch
    aggregate: Aggregate
    params: dict[str, torch.Tensor] = field(compare=False, repr=False)
    param_names: dict[str, str] = field(compare=False)
    rank: int = 0
    scaling: float = 1.0
    dropout: float = 0.0
    fan_in_fan_out: bool = False  # the base op stores its weight as (in, out) (GPT-2 Conv1D)

    @property
    def position(self) -> Position:
        return Position.IN if self.dispatch is Dispatch.PRE else Position.OUT

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


@dataclass(frozen=True)
class NodeInfo:
    """muxc's facts about one fx node."""

    role: Role
    tasks: frozenset[str] = frozenset()  # owning tasks (all tasks for shared nodes)
    site: str | None = None  # base-op module path, for adapter nodes
    adapters: tuple[AdapterRecord, ...] = ()  # for adapter nodes
    fqn: str | None = None  # normalised tensor name, for FROZEN/ADAPTER_PARAM placeholders
    sources: tuple[tuple[str, str], ...] = ()  # provenance: (task, node name in its TaskGraph)


def info(node: fx.Node) -> NodeInfo:
    """The `NodeInfo` of ``node`` (raises if a pass forgot to record it)."""
    rec = node.meta.get(META_KEY)
    if rec is None:
        raise MuxcInternalError(f"node {node.format_node()} has no muxc record")
    return rec


def set_info(node: fx.Node, rec: NodeInfo) -> None:
    node.meta[META_KEY] = rec


class BindingKind(str, Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    CONSTANT = "constant"
    USER_INPUT = "user_input"


@dataclass(frozen=True)
class Binding:
    """What a TaskGraph placeholder is bound to."""

    kind: BindingKind
    fqn: str  # normalised: relative to the HF model, PEFT wrappers (base_layer) removed
    tensor: torch.Tensor | None = field(default=None, compare=False, repr=False)


@dataclass
class TaskGraph:
    """One task captured by torch.export (non-strict) with its adapters as opaque nodes.

    ``gm`` takes its placeholders in order: parameters, buffers, constants, then the user
    inputs ``input_ids, attention_mask``; it returns the logits.
    """

    task: str
    gm: fx.GraphModule
    bindings: dict[str, Binding]  # placeholder name -> binding
    adapters: list[AdapterRecord]
    model_type: str
    trace_seconds: float = 0.0  # seconds spent exporting (or re-binding) this graph
    head: object | None = None  # a `muxc.ir.HeadInfo` when the task trains its own head
    reused_from: str | None = None  # the task whose export this graph re-binds (None: its own)

    def __repr__(self) -> str:
        n = len(self.gm.graph.nodes)
        reused = f", export of {self.reused_from!r}" if self.reused_from is not None else ""
        return (
            f"TaskGraph({self.task!r}, {self.model_type}, {n} nodes, {len(self.adapters)} "
            f"adapters{reused})"
        )

    def frozen_bindings(self) -> dict[str, Binding]:
        """Placeholder name -> binding of every frozen weight/buffer/constant (not adapters,
        not user inputs), in graph order."""
        return {
            n.name: self.bindings[n.name]
            for n in self.gm.graph.find_nodes(op="placeholder")
            if info(n).role is Role.FROZEN
        }


@dataclass
class MuxGraph:
    """All tasks on one backbone.

    ``gm`` placeholders are: frozen tensors (one per distinct weight), adapter parameters of
    every task, then ``input_ids``, ``attention_mask`` and ``mux`` (the runtime's per-step
    `MuxBatch`). It returns one loss per task, in ``tasks`` order (None for an inactive task).
    ``tensors`` binds every non-input placeholder name to its tensor.
    """

    gm: fx.GraphModule
    tasks: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    model_type: str
    sites: dict[str, tuple[AdapterRecord, ...]] = field(default_factory=dict)
    heads: dict = field(default_factory=dict)  # task -> `muxc.ir.HeadInfo`, for tasks with their own head
    # task -> its adapters in its TaskGraph's order (all a Program needs of the task graphs,
    # which are not kept: their graphs and fake tensors would outlive the compile)
    adapters: dict[str, tuple[AdapterRecord, ...]] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        n = len(self.gm.graph.nodes)
        return (
            f"MuxGraph({self.model_type}, tasks={list(self.tasks)}, {n} nodes, "
            f"{len(self.sites)} adapter sites)"
        )

    def nodes_with(self, role: Role) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if info(n).role is role]

    def input_names(self) -> list[str]:
        return [n.name for n in self.gm.graph.find_nodes(op="placeholder")]


def copy_graph(old: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A new graph with ``old``'s nodes (names kept, each ``meta`` dict copied, its values
    shared) and the map from ``old``'s nodes to the copy's. A pass or a re-bind rewrites the
    copy and ``old`` stays as it was (no meta value is mutated in place: `NodeInfo` is frozen;
    fake tensors are shared, not copied: a deep copy of a 12-layer graph costs ~25 ms)."""
    new = fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
    new.set_codegen(copy.deepcopy(old._codegen))
    env: dict[fx.Node, fx.Node] = {}
    for node in old.nodes:
        env[node] = new.node_copy(node, env.__getitem__)
    return new, env
