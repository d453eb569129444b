"""Activation recomputation: which decoder layers a step recomputes, and running them so.

`RecomputePlan` is the compile-time decision (`muxc.passes.plan_recompute` makes it):

- ``none``: autograd keeps what every op saves for backward (PyTorch eager already saves
  nothing for the weight gradient of a frozen GEMM: only the weight itself, for dX).
- ``layers``: each checkpointed decoder layer keeps only its inputs; its forward runs again,
  layer by layer, during backward (`torch.utils.checkpoint`, non-reentrant).
- ``auto``: each decoder layer keeps its inputs and the outputs of the ops named in
  ``RecomputePlan.keep`` (compute-bound ones: frozen GEMMs, matmuls, attention, chosen by
  `muxc.plan.recompute_choice` from the cost model: those that cost the most time to recompute
  per byte kept, until the predicted step time is within a bound); every other op of the layer
  (norms, activations, rotary, casts, residual adds, adapter kernels, the other GEMMs) runs
  again during backward (selective checkpointing).

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
import threading
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
    "keepable",
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
    keep: frozenset[str] | None = None
    """``auto``: the graph nodes whose outputs are kept (None: every candidate, `keepable`)."""

    def checkpoints(self, layer: int | None) -> bool:
        """Is decoder layer ``layer`` recomputed (None: not in a layer, never)?"""
        if self.mode is Recompute.NONE or layer is None:
            return False
        return self.layers is None or layer in self.layers

    def __repr__(self) -> str:
        which = "every layer" if self.layers is None else f"layers {sorted(self.layers)}"
        if self.mode is Recompute.NONE:
            which = "nothing"
        elif self.mode is Recompute.AUTO and self.keep is not None:
            which += f", keeping {len(self.keep)} op outputs"
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
"""The compute-bound aten ops whose outputs a kept node's call caches (a kept ``linear`` runs
as a view, an ``mm`` and a view: only the ``mm`` output is cached; a kept SDPA caches its
output and log-sum-exp, which its backward needs). Views and pointwise ops inside a kept node
run again; ops outside kept nodes never cache (adapter kernels included)."""


def keepable(node: fx.Node) -> bool:
    """Can ``recompute="auto"`` keep this node's output (a frozen GEMM, matmul or attention;
    not an adapter site: each kind's kernel is one cheap opaque op, recomputed)?"""
    from muxc.ir.optable import MATMULS, WEIGHT_GEMMS, attention_call, packet

    if node.op != "call_function":
        return False
    rec = node.meta.get("muxc")
    if rec is not None and getattr(rec, "site", None):
        return False
    if attention_call(node) is not None:
        return True
    kind = packet(node.target)
    return kind in WEIGHT_GEMMS or kind in MATMULS


_KEEPING = threading.local()  # .target: the kept node's target while it runs, else unset


def _kept_call(target):
    """``target`` run with `_KEEPING` set, so the policy caches its compute-bound outputs."""
    def kept(*args, **kwargs):
        outer = getattr(_KEEPING, "target", None)
        _KEEPING.target = target
        try:
            return target(*args, **kwargs)
        finally:
            _KEEPING.target = outer
    kept.__name__ = f"kept_{getattr(target, '__name__', 'op')}".replace(".", "_")
    kept.__qualname__ = kept.__name__
    return kept


def _auto_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    target = getattr(_KEEPING, "target", None)
    if target is not None and (op in SAVED_BY_AUTO or op is target):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _auto_context():
    return create_selective_checkpoint_contexts(_auto_policy)


def _mark_kept(inner: fx.GraphModule, keep: frozenset[str] | None) -> None:
    """Run the nodes of ``inner`` named in ``keep`` (None: every `keepable` one) as kept."""
    changed = False
    for node in inner.graph.nodes:
        if (node.name in keep) if keep is not None else keepable(node):
            if node.op == "call_function":
                node.target = _kept_call(node.target)
                changed = True
    if changed:
        inner.recompile()


# ------------------------------------------------------------------ running


class CheckpointedLayer(torch.nn.Module):
    """Runs ``inner`` (one decoder layer's ops) under non-reentrant `torch.utils.checkpoint`;
    ``selective``: keep the outputs of the kept nodes (`_mark_kept`), recompute the rest. The replay
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
        if selective:
            _mark_kept(inner, plan.keep)
        setattr(split, name, CheckpointedLayer(inner, layer, selective))
    return split


def recomputed_layers(gm: fx.GraphModule) -> list[int]:
    """The decoder layers a `recompute_module` result recomputes, in order."""
    return [m.layer for m in gm.children() if isinstance(m, CheckpointedLayer)]

