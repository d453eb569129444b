"""Activation recomputation: which decoder layers a step recomputes, and running them so.

`RecomputePlan` is the compile-time decision (`muxc.passes.plan_recompute` makes it):

- ``none``: autograd keeps what every op saves for backward (PyTorch eager already saves
  nothing for the weight gradient of a frozen GEMM: only the weight itself, for dX).
- ``layers``: each checkpointed decoder layer keeps only its inputs; its forward runs again,
  layer by layer, during backward (`torch.utils.checkpoint`, non-reentrant).
- ``auto``: each decoder layer keeps its inputs and the outputs of its compute-bound ops
  (frozen GEMMs, attention); during backward only the cheap ops between them
  (norms, activations, rotary, casts, residual adds, adapter kernels) run again (selective
  checkpointing).

`layer_of_nodes(graph)` assigns every op of a merged graph (or of a stage module cut from it)
to its decoder layer, read from ``nn_module_stack`` (adapter sites: from their site path);
ops without a module (sizes, asserts) join the layer around them. `recompute_module(gm, plan)`
cuts ``gm`` into one submodule per contiguous run of a checkpointed layer and runs each under
`torch.utils.checkpoint`; it returns ``gm`` itself when nothing is recomputed.

Exactness with chunk alignment: a `ChunkAttention` reads the K/V earlier chunks kept in
``mux.kv`` and stores its own there. A recomputed layer runs again during backward, when
``mux.kv`` holds later chunks' entries, so the replay gets a private copy of the dict as it was
when the layer first ran: it reads the same kept K/V (the same tensors, so their gradients
reach the same leaves) and its writes go nowhere.

>>> RecomputePlan(Recompute.LAYERS, frozenset({0, 2})).checkpoints(2)
True
>>> layer_index("model.layers.3.mlp.up_proj"), layer_index("lm_head")
(3, None)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from muxc.errors import MuxcInternalError
from muxc.ir.graph import info
from muxc.ir.ops import MuxBatch

__all__ = [
    "Recompute",
    "RecomputePlan",
    "layer_index",
    "layer_of_nodes",
    "recompute_module",
    "SAVED_BY_AUTO",
    "recomputed_layers",
]


class Recompute(str, Enum):
    """What a step keeps for backward and what it computes again (see module doc)."""

    NONE = "none"
    LAYERS = "layers"
    AUTO = "auto"


@dataclass(frozen=True)
class RecomputePlan:
    """The recompute mode and the decoder layers it applies to (None: every layer).

    ``why`` says where the mode came from (the option, or the models' checkpointing).
    """

    mode: Recompute = Recompute.NONE
    layers: frozenset[int] | None = None
    why: str = ""

    def checkpoints(self, layer: int | None) -> bool:
        """Is decoder layer ``layer`` recomputed (None: not in a layer, never)?"""
        if self.mode is Recompute.NONE or layer is None:
            return False
        return self.layers is None or layer in self.layers

    def __repr__(self) -> str:
        which = "every layer" if self.layers is None else f"layers {sorted(self.layers)}"
        if self.mode is Recompute.NONE:
            which = "nothing"
        return f"RecomputePlan({self.mode.value}: {which})"


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(path: str | None) -> int | None:
    """Decoder layer index in a module path (same convention as `muxc.plan.summary.layer_of`)."""
    if not path:
        return None
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


_UNKNOWN = object()


def _own_layer(node: fx.Node):
    """The node's decoder layer, None outside the layers, _UNKNOWN without module info."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        for path, _ in reversed(list(stack.values())):
            layer = layer_index(path)
            if layer is not None:
                return layer
        return None
    rec = node.meta.get("muxc")
    site = getattr(rec, "site", None) if rec is not None else None
    if site:
        return layer_index(site)
    return _UNKNOWN


def layer_of_nodes(graph: fx.Graph) -> dict[fx.Node, int | None]:
    """Every op node of ``graph`` -> its decoder layer (None: outside the layers).

    An op without module information takes its neighbours' layer when the ops before and
    after it agree, else None, so each layer is one contiguous run of ops.
    """
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    own = [_own_layer(n) for n in ops]
    out: dict[fx.Node, int | None] = {}
    prev = None
    for i, node in enumerate(ops):
        layer = own[i]
        if layer is _UNKNOWN:
            nxt = next((x for x in own[i + 1:] if x is not _UNKNOWN), None)
            layer = prev if prev == nxt else None
        out[node] = layer
        prev = layer
    return out


# ------------------------------------------------------------------ selective policy (auto)

_aten = torch.ops.aten
SAVED_BY_AUTO = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._efficient_attention_forward.default,
    _aten._flash_attention_forward.default,
})
"""Ops whose outputs ``recompute="auto"`` keeps: the compute-bound ones (GEMMs and attention,
as functorch's min-cut partitioner never recomputes them); every other op of a layer runs
again in backward, adapter kernels included (each is one opaque custom op, cheap: rank-wide)."""


def _auto_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVED_BY_AUTO:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _auto_context():
    return create_selective_checkpoint_contexts(_auto_policy)


# ------------------------------------------------------------------ running


class CheckpointedLayer(torch.nn.Module):
    """Runs ``inner`` (one decoder layer's ops) under non-reentrant `torch.utils.checkpoint`;
    ``selective``: keep the outputs of `SAVED_BY_AUTO` ops, recompute the rest. The replay
    gets the `MuxBatch` it first saw, with a private copy of its kept K/V (module doc)."""

    def __init__(self, inner: fx.GraphModule, layer: int, selective: bool):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.selective = selective

    def forward(self, *args):
        mux = next((a for a in args if isinstance(a, MuxBatch)), None)
        run: Callable = self.inner
        if mux is not None and mux.kv is not None:
            run = _Replay(self.inner, mux, dict(mux.kv))
        kwargs = {"context_fn": _auto_context} if self.selective else {}
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


class _Replay:
    """First call: ``inner`` as is. Later calls (recomputation): ``inner`` on a copy of the
    `MuxBatch` whose ``kv`` is a fresh copy of ``kept`` (the dict when the layer first ran)."""

    def __init__(self, inner: fx.GraphModule, mux: MuxBatch, kept: dict):
        self.inner, self.mux, self.kept, self.calls = inner, mux, kept, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls > 1:
            replay = dataclasses.replace(self.mux, kv=dict(self.kept))
            args = tuple(replay if a is self.mux else a for a in args)
        return self.inner(*args)


def recompute_module(gm: fx.GraphModule, plan: RecomputePlan) -> fx.GraphModule:
    """``gm`` with each checkpointed decoder layer run as a `CheckpointedLayer`; same
    arguments and results. Returns ``gm`` itself when ``plan`` recomputes nothing in it."""
    if plan.mode is Recompute.NONE:
        return gm
    layers = layer_of_nodes(gm.graph)
    if not any(plan.checkpoints(v) for v in layers.values()):
        return gm
    ids: dict[str, int] = {}
    segment_layer: dict[int, int] = {}
    part, key = 0, _UNKNOWN
    for node in gm.graph.nodes:
        if node not in layers:
            continue
        layer = layers[node]
        k = layer if plan.checkpoints(layer) else None
        if k != key:
            part, key = part + 1, k
            if k is not None:
                if k in segment_layer.values():
                    raise MuxcInternalError(f"decoder layer {k} is not one contiguous run of ops")
                segment_layer[part] = k
        ids[node.name] = part
    # placeholders and get_attr belong to no partition; split_module sends them where used
    split = split_module(gm, gm, lambda n: ids[n.name], keep_original_node_name=True,
                         partition_affix="recompute")
    selective = plan.mode is Recompute.AUTO
    for p, layer in segment_layer.items():
        name = f"submod_recompute_{p}"
        inner = getattr(split, name, None)
        if not isinstance(inner, fx.GraphModule):
            raise MuxcInternalError(f"split_module made no module {name!r} for layer {layer}")
        setattr(split, name, CheckpointedLayer(inner, layer, selective))
    return split


def recomputed_layers(gm: fx.GraphModule) -> list[int]:
    """The decoder layers a `recompute_module` result recomputes, in order."""
    return [m.layer for m in gm.children() if isinstance(m, CheckpointedLayer)]

