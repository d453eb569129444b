"""`ModelSummary`: what one step of a merged program costs, as work polynomials per op.

`summarize_graph(mux)` walks a `MuxGraph` once. Each op node becomes an `OpCost`: the
`OpKey` that prices it and its forward/backward work as a `Poly` in the step's rows ``b`` and
sequence length ``s``, read off the symbolic shapes torch.export recorded in
``node.meta["val"]`` (`muxc.ir.shapes`; the weight placeholders give GEMMs their concrete
``(K, N)``). Which ops are GEMMs, matmuls, attention and aliases: `muxc.ir.optable`.
Adapter sites become one `OpCost` per task (work = that task's tokens). A second entry point,
`muxc.plan.config_summary.summarize_config`, builds the same summary from an HF config alone.

Which ops run a backward is found by propagating "needs grad" from the adapter parameters:
ops upstream of the first adapter, and ops on constants (masks, rotary tables), have none.
Activation memory is the bytes autograd saves for backward (see `_SAVES`), counted once per
saved tensor (views resolved to the tensor that owns the storage).

Of a compiled program (not run as a doctest: it needs one; tests/test_plan_cost.py does):

>>> s = summarize_graph(program.mux)                            # doctest: +SKIP
>>> s                                                           # doctest: +SKIP
ModelSummary(graph, tasks=['t0', 't1'], 2 layers, 268 ops, 15 GEMMs, 2 attention, 18 adapters)
"""

from __future__ import annotations

import operator
import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import sympy
import torch
import torch.fx as fx

from muxc.errors import MuxcInternalError
from muxc.ir import CAUSAL_LM, HeadLoss, LMHeadLoss, MuxGraph, Position, PrefixAttention, Role, info
from muxc.ir.optable import (
    MATMULS,
    WEIGHT_GEMMS,
    aliases_input,
    attention_call,
    gemm_operands,
    packet,
)
from muxc.ir.recompute import Recompute, RecomputePlan, keepable, layer_of_nodes
from muxc.ir.shapes import B, S, GraphShapes, meta_val
from muxc.kernels.replay import Replay
from muxc.kernels.swiglu import swiglu
from muxc.kinds import spec_of
from muxc.plan.ops import MATH, CostModelError, OpKey, OpKind, Poly

__all__ = ["KV", "Work", "OpCost", "ModelSummary", "summarize_graph", "as_summary", "layer_of"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Work:
    """``amount`` units of work priced by ``key``."""

    key: OpKey
    amount: Poly


class KV(str, Enum):
    """How an op's work grows when a chunk attends to ``kv_len`` keys (kept K/V of earlier
    chunks plus its own ``s``): not at all, by ``kv_len / s`` (attention itself), or by
    ``(kv_len - s) / s`` (gathering and concatenating the kept K/V)."""

    NONE = "none"
    TOTAL = "total"
    PAST = "past"


@dataclass(frozen=True)
class OpCost:
    """The cost of one graph node (or one task's adapter at a site).

    ``node``: the fx node's name, with ``[part]`` appended when a node has several costs
    (``site_x[t0]``: task t0's adapter at site_x; ``[add]``, ``[kv]``, ``[acc0]``).
    ``task``: set for per-task ops (adapters, losses): their polynomials take that task's
    rows as ``b``. ``layer``: the decoder layer index, None outside the layers. ``kv``: how
    the work scales with the attended length (`KV`). ``site``: for adapters, the site they
    share: one kernel call serves every task there, so its fixed overhead is paid once.
    """

    node: str
    forward: Work | None
    backward: Work | None = None
    task: str | None = None
    layer: int | None = None
    kv: KV = KV.NONE
    site: str | None = None


@dataclass(frozen=True)
class ModelSummary:
    """A merged program's step cost and memory, independent of the device.

    ``frozen_bytes``: shared frozen weights (once). ``adapter_numel``/``adapter_bytes``: per
    task trainable parameters. ``saved``: activation bytes saved for backward by shared ops
    (``b`` = rows of the whole step); ``saved_per_task``: by per-task ops (``b`` = the task's
    rows). ``source``: "graph" or "config". With recomputation (`RecomputePlan`), ``saved`` is
    what stays alive from forward to backward (ops outside recomputed layers, each recomputed
    layer's inputs, and under ``auto`` its GEMM and attention outputs) and ``recompute_peak``
    the largest layer's recomputed saves, alive while that layer's backward runs.
    """

    ops: tuple[OpCost, ...]
    tasks: tuple[str, ...]
    layers: int
    frozen_bytes: int
    adapter_numel: Mapping[str, int]
    adapter_bytes: Mapping[str, int]
    saved: Poly
    saved_per_task: Mapping[str, Poly]
    source: str = "graph"
    recompute_peak: Poly = Poly()
    keepable: Mapping[str, Poly] = dataclasses.field(default_factory=dict)
    """Under ``recompute="auto"``: node -> bytes it keeps if kept, for each `keepable` node of
    a recomputed layer (what `muxc.plan.recompute_choice` chooses from)."""

    def __repr__(self) -> str:
        kinds = Counter(o.forward.key.kind for o in self.ops if o.forward is not None)
        adapters = kinds[OpKind.LORA] + kinds[OpKind.IA3]
        return (f"ModelSummary({self.source}, tasks={list(self.tasks)}, {self.layers} layers, "
                f"{len(self.ops)} ops, {kinds[OpKind.GEMM]} GEMMs, "
                f"{kinds[OpKind.ATTENTION]} attention, {adapters} adapters)")

    def op_keys(self) -> list[OpKey]:
        """Every key this summary is priced with (what `profile_device` should time)."""
        keys = set()
        for o in self.ops:
            for w in (o.forward, o.backward):
                if w is not None:
                    keys.add(w.key)
        return sorted(keys)

    @cached_property
    def grouped(self) -> tuple[tuple[Work | None, Work | None, str | None, KV, int], ...]:
        """Non-adapter ops with equal work merged: ``(forward, backward, task, kv, count)``."""
        c = Counter((o.forward, o.backward, o.task, o.kv) for o in self.ops if o.site is None)
        return tuple((f, b, t, kv, n) for (f, b, t, kv), n in c.items())

    @cached_property
    def sites(self) -> tuple[tuple[tuple[tuple[str, Work, Work | None], ...], int], ...]:
        """Adapter sites with equal adapters merged: ``(((task, fwd, bwd), ...), count)``."""
        members: dict[str, list] = {}
        for o in self.ops:
            if o.site is not None:
                members.setdefault(o.site, []).append((o.task, o.forward, o.backward))
        c = Counter(tuple(sorted(m, key=lambda x: x[0])) for m in members.values())
        return tuple(c.items())

    def restrict(self, tasks) -> ModelSummary:
        """This summary with only ``tasks``' adapters and losses (for an hTask's program)."""
        keep = set(tasks)
        unknown = keep - set(self.tasks)
        if unknown:
            raise MuxcInternalError(f"restrict: unknown tasks {sorted(unknown)}")
        return ModelSummary(
            ops=tuple(o for o in self.ops if o.task is None or o.task in keep),
            tasks=tuple(t for t in self.tasks if t in keep),
            layers=self.layers,
            frozen_bytes=self.frozen_bytes,
            adapter_numel={t: n for t, n in self.adapter_numel.items() if t in keep},
            adapter_bytes={t: n for t, n in self.adapter_bytes.items() if t in keep},
            saved=self.saved,
            saved_per_task={t: p for t, p in self.saved_per_task.items() if t in keep},
            source=self.source,
            recompute_peak=self.recompute_peak,
        )


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(path: str | None) -> int | None:
    """Decoder layer index in a module path.

    >>> layer_of("model.layers.3.self_attn.q_proj"), layer_of("lm_head")
    (3, None)
    """
    if not path:
        return None
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def _node_layer(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in reversed(list(stack.values())):
        layer = layer_of(path)
        if layer is not None:
            return layer
    return None


# ------------------------------------------------------------------ symbolic shapes -> Poly


class _Shapes(GraphShapes):
    """The graph's symbolic sizes (`muxc.ir.shapes`), turned into `Poly`s in (b, s)."""

    def __init__(self, mux: MuxGraph):
        super().__init__(mux)
        if not self.dynamic:
            raise MuxcInternalError(
                "summarize_graph: the inputs have no dynamic (batch, seq) dims; the merged graph "
                "must be exported with dynamic batch and sequence"
            )
        self._cache: dict[sympy.Expr, Poly] = {}

    def poly(self, expr: sympy.Expr, what: fx.Node) -> Poly:
        expr = sympy.expand(expr)
        hit = self._cache.get(expr)
        if hit is not None:
            return hit
        extra = expr.free_symbols - {B, S}
        try:
            if extra:
                raise sympy.PolynomialError(f"free symbols {sorted(map(str, extra))}")
            p = sympy.Poly(expr, B, S)
        except sympy.PolynomialError as e:
            raise MuxcInternalError(
                f"summarize_graph: size {expr} of {what.format_node()} is not a polynomial in "
                f"batch and sequence ({e})"
            ) from None
        out = Poly(tuple(sorted((int(i), int(j), float(c)) for (i, j), c in p.terms())))
        self._cache[expr] = out
        return out


def _val(node) -> torch.Tensor | None:
    v = meta_val(node)
    return v if isinstance(v, torch.Tensor) else None


def per_call_work(spec, k: int, n: int, rank: int, pre: bool, dtype: str,
                  record=None) -> list[tuple[str, Work]]:
    """Work an adapter kind does once per site call and task, whatever its tokens, by kind:
    its per-call GEMMs (``spec.call_gemms`` of ``record`` when given and the kind reads them
    off its parameters, e.g. a P-tuning encoder; else ``spec.per_call_gemm`` from the site's
    sizes) and, for a kind with ``per_call_passes`` (DoRA's weight norm: a ``(n, r) @ (r, k)``
    GEMM then a square-and-sum over its ``(n, k)`` result), that elementwise pass. Forward
    only: whatever backward it has is folded into the GEMM's rows by the kind."""
    if record is not None and spec.call_gemms is not None:
        gemms = spec.call_gemms(record)
    else:
        one = spec.per_call_gemm(k, n, rank, pre)
        gemms = [] if one is None else [one]
    out = []
    for i, ((kk, nn), rows) in enumerate(gemms):
        key = OpKey(OpKind.GEMM, (kk, nn), dtype)
        if spec.per_call_passes:
            label = "norm_gemm" if len(gemms) == 1 else f"norm_gemm{i}"
            passes = spec.per_call_passes * rows * nn * key.itemsize
            out += [(label, Work(key, Poly.const(rows))),
                    (label.replace("_gemm", ""), Work(OpKey(OpKind.ELEMENTWISE, dtype=dtype),
                                                     Poly.const(passes)))]
        else:
            out.append((f"call_gemm{i}", Work(key, Poly.const(rows))))
    return out


def _floating(node: fx.Node) -> bool:
    """Does ``node`` produce a floating tensor (or a sequence holding one)?"""
    v = node.meta.get("val")
    vals = v if isinstance(v, (list, tuple)) else (v,)
    return any(isinstance(x, torch.Tensor) and x.dtype.is_floating_point for x in vals)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in (*node.args, *node.kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(x, fx.Node) and (_val(x) is not None
                                           or isinstance(x.meta.get("val"), (list, tuple))):
                out.append(x)
    return out


_PASS_THROUGH = {aten.add.Tensor, aten.sub.Tensor, aten.cat.default, aten.add_.Tensor}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.mean.default, aten.sum.default}
_SAVE_OTHER = {aten.mul.Tensor, aten.div.Tensor}
_SAVE_INPUT = {aten.pow.Tensor_Scalar, aten.silu.default, aten.log.default, aten.gelu.default,
               aten.sin.default, aten.cos.default, aten.erf.default, aten.softplus.default}
_SAVE_OUTPUT = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
                aten.log_softmax.int, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
                aten.exp.default, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default}
_MATH = {aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.rsqrt.default, aten.sqrt.default,
         aten.silu.default, aten.gelu.default, aten.exp.default, aten.tanh.default,
         aten.sigmoid.default, aten.log.default, aten.sin.default, aten.cos.default,
         aten.erf.default, aten.softplus.default}  # priced as ELEMENTWISE/math
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
_DROPOUT = {aten.dropout.default, aten.native_dropout.default}
_REPLAY_PASSES = {aten.to.dtype: 1, operator.getitem: 0, swiglu: 5,
                  aten.native_layer_norm.default: 5, aten.layer_norm.default: 5}
"""Passes over a replayed tensor's bytes per `Replay` step (default 3: a binary op)."""
_SAVES = (_SAVE_OTHER, _SAVE_INPUT, _SAVE_OUTPUT, _NORMS, _DROPOUT)
"""Ops whose backward needs saved activations (everything else saves none):
mul/div save the other operand of each input needing a gradient; unary pointwise ops their
input, or their output when the derivative is written in it (relu, sigmoid, tanh, exp, rsqrt,
sqrt, reciprocal, softmaxes); norms input and per-row statistics; dropout its mask;
attention q, k, v, output, per-row log-sum-exp and its mask (as an additive mask in q's dtype,
one per call); a GEMM with a frozen weight saves
nothing but the weight (dX = dY W); LoRA/IA3 save their input; the loss its log-probabilities.
"""


class _Walker:
    def __init__(self, mux: MuxGraph, recompute: RecomputePlan | None = None):
        self.mux = mux
        self.recompute = recompute or RecomputePlan()
        # recomputed layer (None: kept ops) -> (storage-owning node -> bytes, extra bytes)
        self.buckets: dict[int | None, tuple[dict[fx.Node, Poly], Poly]] = {}
        self.bucket_of: dict[fx.Node, int | None] = {}
        self.shapes = _Shapes(mux)
        self.grad: dict[fx.Node, bool] = {}
        self.ops: list[OpCost] = []
        self.saved: dict[fx.Node, Poly] = {}  # storage-owning node -> bytes
        self.saved_extra = Poly()
        self.saved_per_task: dict[str, Poly] = {t: Poly() for t in mux.tasks}
        self.fused_heads: set[fx.Node] = set()  # LM-head weights of fused losses, priced
        self.ew = OpKey(OpKind.ELEMENTWISE)
        self.math = OpKey(OpKind.ELEMENTWISE, variant=MATH)
        self.view = OpKey(OpKind.VIEW)

    # -- helpers
    def bytes(self, node: fx.Node, effective: bool = True) -> Poly:
        v = _val(node)
        if v is None:
            return Poly()
        expr = self.shapes.numel(v, effective) * v.dtype.itemsize
        return self.shapes.poly(expr, node)

    def tokens(self, x: fx.Node, last: int) -> Poly:
        """Rows of ``x`` seen as a matrix with ``last`` columns."""
        v = _val(x)
        return self.shapes.poly(self.shapes.numel(v, effective=False) / last, x)

    def root(self, node: fx.Node) -> fx.Node:
        while (node.op == "call_function" and aliases_input(node.target) and node.args
               and isinstance(node.args[0], fx.Node) and not self.copies(node)):
            node = node.args[0]
        return node

    def copies(self, node: fx.Node) -> bool:
        """An aliasing op that materialises a copy anyway."""
        out, src = _val(node), _val(node.args[0]) if node.args else None
        if out is None or src is None:
            return False
        t = node.target
        if t in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other):
            return out.dtype != src.dtype or out.device != src.device
        if t in (aten.reshape.default, aten.contiguous.default, aten.flatten.using_ints):
            same = tuple(map(str, out.shape)) == tuple(map(str, src.shape))
            return not same and not src.is_contiguous()
        return False

    def save(self, node: fx.Node) -> None:
        r = self.root(node)
        if r.op == "placeholder":  # weights and adapter parameters are not activations
            return
        if r not in self.saved and _val(r) is not None:
            self.saved[r] = self.bytes(r)

    def add(self, node: fx.Node, fwd: Work | None, bwd: Work | None, task=None, layer=None,
            suffix: str = "", kv: KV = KV.NONE, site: str | None = None) -> None:
        self.ops.append(OpCost(node.name + suffix, fwd, bwd, task,
                               _node_layer(node) if layer is None else layer, kv, site))

    def needs_grad(self, node) -> bool:
        return isinstance(node, fx.Node) and self.grad.get(node, False)

    # -- walk
    def run(self) -> None:
        graph = self.mux.gm.graph
        if self.recompute.mode is not Recompute.NONE:
            self.bucket_of = {n: (l if self.recompute.checkpoints(l) else None)
                              for n, l in layer_of_nodes(graph).items()}
        for node in graph.nodes:
            if node.op == "placeholder":
                self.grad[node] = info(node).role is Role.ADAPTER_PARAM
                continue
            if node.op != "call_function":
                continue
            bucket = self.bucket_of.get(node)  # saves go to the bucket of the node's layer
            self.saved, self.saved_extra = self.buckets.get(bucket, ({}, Poly()))
            self.visit(node)
            self.buckets[bucket] = (self.saved, self.saved_extra)
        self.saved, self.saved_extra = self.buckets.get(None, ({}, Poly()))
        self.accumulations()

    def visit(self, node: fx.Node) -> None:
        role = info(node).role
        floating = _floating(node)
        self.grad[node] = role in (Role.ADAPTER, Role.LOSS) or (
            floating and any(self.needs_grad(a) for a in _differentiable_args(node))
        )
        if role is Role.ADAPTER:
            self.adapter(node)
        elif role is Role.LOSS:
            self.loss(node)
        else:
            self.backbone(node)

    def adapter(self, node: fx.Node) -> None:
        rec = info(node)
        x = node.args[0]
        layer = layer_of(rec.site)
        lora = False
        xv, hv = _val(x), _val(node)
        k, n = int(xv.shape[-1]), int(hv.shape[-1])
        for r in rec.adapters:
            spec = spec_of(r.kind)
            pre = r.position is Position.IN
            dtype = _dt(next(iter(r.params.values())).dtype)
            key = OpKey(OpKind(spec.cost_op), spec.cost_dims(k, n, r.rank, pre), dtype)
            lora = lora or spec.adds_to_output
            w = Work(key, Poly.tokens())
            self.add(node, w, w, task=r.task, layer=layer, suffix=f"[{r.task}]", site=node.name)
            for suffix, fwd in per_call_work(spec, k, n, r.rank, pre, dtype, r):
                self.add(node, fwd, None, task=r.task, layer=layer, suffix=f"[{r.task}:{suffix}]",
                         site=node.name)
        for kept in self.kept_inputs(x):
            self.save(kept)
        if lora:  # h + lora(x): one add over the output; its backward passes the gradient
            out_bytes = self.bytes(node)
            self.add(node, Work(self.ew, out_bytes.scale(3)), Work(self.view, Poly.const(1)),
                     layer=layer, suffix="[add]")

    def kept_inputs(self, x: fx.Node) -> list:
        """What an adapter keeps of its input ``x``: the roots of a `Replay` node whose
        activation roots need a gradient (their ops keep them), else ``x``."""
        target = x.target if x.op == "call_function" else None
        if not isinstance(target, Replay):
            return [x]
        roots = x.args[1:]
        if not all(self.needs_grad(r) for r, act in zip(roots, target.activation) if act):
            return [x]
        return list(roots)

    def loss(self, node: fx.Node) -> None:
        task = info(node).tasks
        (task,) = tuple(task)
        logits = node.args[0]
        v = _val(logits)
        vocab = int(v.shape[-1])
        if isinstance(node.target, LMHeadLoss):  # the shared frozen head fused with the loss
            x, weight = node.args[0], node.args[2]
            wv = _val(weight)
            hidden, vocab = int(wv.shape[1]), int(wv.shape[0])
            if weight not in self.fused_heads:  # priced once, as the linear it replaced
                self.fused_heads.add(weight)
                gemm = Work(OpKey(OpKind.GEMM, (hidden, vocab), _dt(wv.dtype)), self.tokens(x, hidden))
                self.add(node, gemm, gemm if self.needs_grad(x) else None, suffix="[lm_head]")
            w = Work(OpKey(OpKind.LOSS, (vocab,), _dt(wv.dtype)), Poly.tokens())
            self.add(node, w, w, task=task)
            # kept for backward: the gradient w.r.t. the task's hidden rows, not its logits
            itemsize = _val(x).element_size() if _val(x) is not None else 4
            self.saved_per_task[task] = self.saved_per_task[task] + Poly.tokens(float(itemsize * hidden))
            return
        if isinstance(node.target, HeadLoss):  # the task's own head, then its loss
            weight = _val(node.args[2])
            hidden, vocab = int(weight.shape[1]), int(weight.shape[0])
            per = Poly.tokens() if node.target.head.problem == CAUSAL_LM else Poly(((1, 0, 1.0),))
            w = Work(OpKey(OpKind.GEMM, (hidden, vocab), _dt(weight.dtype)), per)
            self.add(node, w, w, task=task, suffix="[head]")
            if node.target.head.problem != CAUSAL_LM:  # pooled rows only: one term per row
                self.saved_per_task[task] = self.saved_per_task[task] + Poly(((1, 0, 4.0 * vocab),))
                return
        w = Work(OpKey(OpKind.LOSS, (vocab,), _dt(v.dtype)), Poly.tokens())
        self.add(node, w, w, task=task)
        self.saved_per_task[task] = self.saved_per_task[task] + Poly.tokens(4.0 * vocab)

    def backbone(self, node: fx.Node) -> None:
        t = node.target
        out = _val(node)
        grad = self.grad[node]
        view1 = Work(self.view, Poly.const(1))
        if isinstance(t, torch._ops.HigherOrderOperator):
            self.higher_order(node)
            return
        if isinstance(t, Replay):  # an identity; its adapters' backwards replay its steps once
            bwd = view1 if grad else None
            if grad and self.kept_inputs(node) != [node]:
                passes = sum(_REPLAY_PASSES.get(step[0], 3) for step in t.steps)
                bwd = Work(self.ew, self.bytes(node).scale(passes))
            self.add(node, view1, bwd)
            return
        if out is None:  # symbolic sizes, asserts; split/unbind-like ops return views
            self.add(node, view1, view1 if grad else None)
            return
        args = _tensor_args(node)
        kind = packet(t)
        if kind in WEIGHT_GEMMS and self.gemm(node, grad):
            return
        attn = attention_call(node)
        if attn is not None:  # a ChunkAttention may attend to kept K/V
            self.attention(node, grad, *attn)
            if isinstance(t, PrefixAttention):
                self.prefix(node, grad, attn[0])
            return
        if kind in MATMULS:
            self.matmul(node, grad)
            return
        if t is aten.embedding.default:
            self.add(node, Work(self.ew, self.bytes(node).scale(2)), None)
            return
        if t is swiglu:
            self.swiglu(node, args, grad)
            return
        if aliases_input(t) and not self.copies(node):
            bwd = None
            if grad:
                bwd = view1
                if t is aten.expand.default:  # backward sums the broadcast gradient
                    bwd = Work(self.ew, self.bytes(node, effective=False) + self.bytes(args[0]))
            self.add(node, view1, bwd)
            return
        fwd_bytes = self.bytes(node)
        for a in args:
            fwd_bytes = fwd_bytes + self.bytes(a)
        key = self.math if t in _MATH else self.ew
        bwd = self.elementwise_backward(node, args, key) if grad else None
        self.add(node, Work(key, fwd_bytes), bwd)
        if grad:
            self.saves(node, args)

    def swiglu(self, node: fx.Node, args: list[fx.Node], grad: bool) -> None:
        """`muxc.kernels.swiglu`: silu then mul forward (5 passes over the output's bytes);
        backward recomputes silu, then ``grad * silu`` for ``up`` and ``silu_backward(grad *
        up)`` for ``gate`` (2 + 3 + 6); keeps ``gate`` (and ``up`` when ``gate`` needs a
        gradient)."""
        gate, up = args
        out = self.bytes(node)
        need_gate, need_up = self.needs_grad(gate), self.needs_grad(up)
        bwd = None
        if grad:
            bwd = Work(self.math, out.scale(2 + 3 * need_up + 6 * need_gate))
            if need_gate or need_up:
                self.save(gate)
            if need_gate:
                self.save(up)
        self.add(node, Work(self.math, out.scale(5)), bwd)

    def elementwise_backward(self, node: fx.Node, args: list[fx.Node], key: OpKey) -> Work:
        t = node.target
        grads = [a for a in args if self.needs_grad(a)]
        out_b = self.bytes(node)
        if t in _PASS_THROUGH:
            reduce = Poly()
            for a in grads:  # broadcast inputs need their gradient summed
                if self.bytes(a) != out_b:
                    reduce = reduce + out_b + self.bytes(a)
            return Work(self.ew, reduce) if reduce.terms else Work(self.view, Poly.const(1))
        if t in _REDUCE:
            return Work(self.ew, sum((self.bytes(a).scale(2) for a in grads), Poly()))
        # `elementwise_backward_bytes` on polynomials: 3 * max(out, in) per grad input
        total = Poly()
        for a in grads:
            a_b = self.bytes(a)
            big = out_b if _dominates(out_b, a_b) else a_b
            total = total + big.scale(3)
        return Work(key, total)

    def saves(self, node: fx.Node, args: list[fx.Node]) -> None:
        t = node.target
        if t in _SAVE_OTHER:
            for a in args:
                if self.needs_grad(a):
                    for other in args:
                        if other is not a:
                            self.save(other)
        elif t in _SAVE_INPUT:
            self.save(args[0])
        elif t in _SAVE_OUTPUT:
            self.save(node)
        elif t in _NORMS:
            self.save(args[0])  # and two fp32 statistics per row
            out = _val(node)
            rows = self.shapes.numel(out, effective=False) / int(out.shape[-1])
            self.saved_extra = self.saved_extra + self.shapes.poly(rows * 8, node)
        elif t in _DROPOUT and _dropout_p(node) > 0:  # a one-byte mask per element
            out = _val(node)
            self.saved_extra = self.saved_extra + self.bytes(node).scale(1 / out.dtype.itemsize)

    def gemm(self, node: fx.Node, grad: bool) -> bool:
        x, w = gemm_operands(node)
        src = self.root(w) if isinstance(w, fx.Node) else None
        if src is None or src.op != "placeholder" or info(src).role is not Role.FROZEN:
            return False
        xv, out = _val(x), _val(node)
        k, n = int(xv.shape[-1]), int(out.shape[-1])
        work = Work(OpKey(OpKind.GEMM, (k, n), _dt(out.dtype)), self.tokens(x, k))
        self.add(node, work, work if self.needs_grad(x) else None)
        return True

    def attention(self, node: fx.Node, grad: bool, args, kwargs, chunked: bool) -> None:
        q, k, v = args[:3]
        qv, kv = _val(q), _val(k)
        heads, d = int(qv.shape[-3]), int(qv.shape[-1])
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        variant = "mask" if mask is not None or chunked else ("causal" if causal else "none")
        rows = self.shapes.numel(qv, effective=False) / d  # b * heads * s
        amount = self.shapes.poly(rows * self.shapes.expr(kv.shape[-2]), node)
        work = Work(OpKey(OpKind.ATTENTION, (heads, d), _dt(qv.dtype), variant), amount)
        self.add(node, work, work if grad else None, kv=KV.TOTAL)
        if chunked:  # kept K/V gathered to this step's rows and prepended: read + write twice
            kv_bytes = self.bytes(k, effective=False) + self.bytes(v, effective=False)
            self.add(node, Work(self.ew, kv_bytes.scale(4)),
                     Work(self.ew, kv_bytes.scale(2)) if grad else None, suffix="[kv]", kv=KV.PAST)
        if grad:
            for a in (q, k, v, node):
                self.save(a)
            extra = rows * 4  # per-row log-sum-exp, fp32
            if isinstance(mask, fx.Node):  # kept as an additive mask in q's dtype, per call
                extra = extra + self.shapes.numel(_val(mask), effective=False) * qv.dtype.itemsize
            self.saved_extra = self.saved_extra + self.shapes.poly(extra, node)

    def prefix(self, node: fx.Node, grad: bool, qkv) -> None:
        """Each prefix-tuning task's extra at an attention node: its own attention call over
        ``n`` more key columns, the ``[P; K]``, ``[P; V]`` copies, and its layer's slice of the
        encoder MLP (``prefix_projection``), once per step (`muxc.ir.prefix`)."""
        qv = _val(qkv[0])
        heads, d, isz = int(qv.shape[-3]), int(qv.shape[-1]), qv.dtype.itemsize
        dtype = _dt(qv.dtype)
        for r in node.target.records:
            n = r.rank
            scores = Work(OpKey(OpKind.ATTENTION, (heads, d), dtype, "mask"), Poly(((1, 1, heads * n),)))
            self.add(node, scores, scores if grad else None, task=r.task, suffix=f"[{r.task}]")
            kv = Work(self.ew, Poly(((1, 1, 4.0 * heads * d * isz), (1, 0, 4.0 * heads * n * d * isz))))
            self.add(node, kv, kv if grad else None, task=r.task, suffix=f"[{r.task}:kv]")
            self.saved_per_task[r.task] = self.saved_per_task[r.task] + Poly(
                ((1, 1, 2.0 * heads * d * isz), (1, 0, 2.0 * heads * (n + 1) * d * isz)))
            if "w2" in r.params:
                hidden, token_dim = (int(x) for x in r.params["w1"].shape)
                width = int(r.params["w2"].shape[0]) // node.target.layers
                for i, (k, m) in enumerate(((token_dim, hidden), (hidden, width))):
                    w = Work(OpKey(OpKind.GEMM, (k, m), _dt(r.params["w1"].dtype)), Poly.const(n))
                    self.add(node, w, w, task=r.task, suffix=f"[{r.task}:enc{i}]")

    def matmul(self, node: fx.Node, grad: bool) -> None:
        args = _tensor_args(node)
        # symbolic: int() on a SymInt would specialise the graph's shape env for good
        kdim = self.shapes.expr(_val(gemm_operands(node)[0]).shape[-1])
        flops = self.shapes.poly(self.shapes.numel(_val(node), effective=False) * 2 * kdim, node)
        key = OpKey(OpKind.MATMUL, (), _dt(_val(node).dtype))
        self.add(node, Work(key, flops), Work(key, flops.scale(2)) if grad else None)
        if grad:
            for x in args:
                self.save(x)

    def higher_order(self, node: fx.Node) -> None:
        """A higher-order op (e.g. a no-grad region): its outputs written once, plus one
        dispatch per op inside it."""
        total = Poly()
        for user in node.users:
            if user.target is operator.getitem:
                total = total + self.bytes(user).scale(2)
        inner = 1
        for a in node.args:
            if isinstance(a, fx.Node) and a.op == "get_attr":
                sub = getattr(self.mux.gm, a.target, None)
                if isinstance(sub, fx.GraphModule):
                    inner = max(1, sum(1 for n in sub.graph.nodes if n.op == "call_function"))
        self.add(node, Work(self.ew, total), None)
        for i in range(inner - 1):
            self.add(node, Work(self.view, Poly.const(1)), None, suffix=f"[{i}]")

    def accumulations(self) -> None:
        """A tensor needing grad used by several differentiable ops gets its gradients
        summed in backward: one add per extra user."""
        for node, g in self.grad.items():
            if not g or node.op == "placeholder":
                continue
            users = [u for u in node.users if self.grad.get(u, False)]
            uses = sum(sum(1 for a in _differentiable_args(u) if a is node) for u in users)
            b3 = self.bytes(node).scale(3)
            for i in range(uses - 1):
                self.add(node, None, Work(self.ew, b3), suffix=f"[acc{i}]")


def _differentiable_args(node: fx.Node) -> list[fx.Node]:
    """The tensor arguments a gradient flows to (a `Replay` node's roots get none)."""
    if isinstance(node.target, Replay):
        return node.args[:1]
    return _tensor_args(node)


def _dropout_p(node: fx.Node) -> float:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    return float(p) if isinstance(p, (int, float)) else 0.5


def _dominates(a: Poly, b: Poly) -> bool:
    return a(4.0, 64.0) >= b(4.0, 64.0)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_graph(mux: MuxGraph, recompute: RecomputePlan | None = None) -> ModelSummary:
    """Summarise a merged program's step cost and memory (see module doc). Pure: reads only.

    ``recompute``: what the step recomputes (None: nothing); it changes the memory only."""
    w = _Walker(mux, recompute)
    w.run()
    frozen: dict[int, int] = {}
    for n in mux.nodes_with(Role.FROZEN):
        t = mux.tensors[n.name]
        frozen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    numel = {t: 0 for t in mux.tasks}
    nbytes = {t: 0 for t in mux.tasks}
    seen = set()
    for recs in mux.sites.values():
        for r in recs:
            for p in r.params.values():
                if id(p) not in seen:
                    seen.add(id(p))
                    numel[r.task] += p.numel()
                    nbytes[r.task] += p.numel() * p.element_size()
    saved, peak, candidates = _kept_bytes(w)
    layers = {o.layer for o in w.ops if o.layer is not None}
    return ModelSummary(
        ops=tuple(w.ops),
        tasks=tuple(mux.tasks),
        layers=max(layers) + 1 if layers else 0,
        frozen_bytes=sum(frozen.values()),
        adapter_numel=numel,
        adapter_bytes=nbytes,
        saved=saved,
        saved_per_task=w.saved_per_task,
        source="graph",
        recompute_peak=peak,
        keepable=candidates,
    )


def _kept_bytes(w: _Walker) -> tuple[Poly, Poly, dict[str, Poly]]:
    """(bytes kept from forward to backward, largest recomputed layer's saves, keepable
    node -> its bytes).

    Kept: what ops outside recomputed layers save; each recomputed layer's inputs (the
    checkpoint holds them: activations only, weights excluded), and under ``auto`` the outputs
    of the nodes the plan keeps (`RecomputePlan.keep`; None: every keepable node).
    """
    kept, extra = w.buckets.get(None, ({}, Poly()))
    kept = dict(kept)
    peak = Poly()
    auto = w.recompute.mode is Recompute.AUTO
    candidates: dict[str, Poly] = {}
    for layer, (saved, more) in w.buckets.items():
        if layer is None:
            continue
        total = sum(saved.values(), more)
        peak = total if _dominates(total, peak) else peak
        for node, bucket in w.bucket_of.items():
            if bucket != layer:
                continue
            for a in _tensor_args(node):
                r = w.root(a)
                if w.bucket_of.get(r) != layer and r.op != "placeholder" and r not in kept:
                    kept[r] = w.bytes(r)
            if auto and keepable(node):
                candidates[node.name] = _auto_kept(w, node)
    keep = w.recompute.keep
    for name, b in candidates.items():
        if keep is None or name in keep:
            extra = extra + b
    return sum(kept.values(), extra), peak, candidates


def _auto_kept(w: _Walker, node: fx.Node) -> Poly:
    """Bytes ``recompute="auto"`` keeps of a kept node: its output, and for attention also the
    per-row log-sum-exp (fp32, one per query row and head), which SDPA's backward reads."""
    attn = attention_call(node)
    if attn is None:
        return w.bytes(node)
    q = _val(attn[0][0])
    rows = w.shapes.numel(q, effective=False) / int(q.shape[-1])
    return w.bytes(node) + w.shapes.poly(rows * 4, node)


def as_summary(model: ModelSummary | MuxGraph) -> ModelSummary:
    """``model`` itself, or the summary of a `MuxGraph` (walks it: keep the result to reuse)."""
    if isinstance(model, ModelSummary):
        return model
    if isinstance(model, MuxGraph):
        return summarize_graph(model)
    raise CostModelError(f"expected a ModelSummary or MuxGraph, got {type(model).__name__}")
