"""Node cost policies that balance pipeline stages: what one op of a `MuxGraph` costs.

`muxc.passes.partition` cuts the graph into stages minimising the largest stage cost; which
cost is a policy, handed to it as ``node_cost(node) -> float`` with a ``name`` (the unit its
tables print). Two policies:

- `FlopCost` (the pass's default): FLOPs at a `ShapeHint`, read off the exported shapes;
- `LatencyCost`: predicted forward + backward seconds from the cost model (`CostModel`).

>>> partition(mux, None, stages=4, node_cost=LatencyCost(mux))   # doctest: +SKIP
PartitionedGraph(llama, 4 stages, 20 subgraphs (9 compute, 8 peft, 3 communicate), stage cost 0.00146 / 0.00473 / 0.00446 / 0.0014 s)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from muxc.ir import MuxGraph, Position, Role, ShapeHint
from muxc.kinds import spec_of
from muxc.ir.optable import FREE, GEMMS, attention_call, gemm_operands, has_bias, packet
from muxc.ir.shapes import GraphShapes, meta_val
from muxc.plan.cost import CostModel
from muxc.plan.summary import summarize_graph

__all__ = ["FlopCost", "LatencyCost"]


class FlopCost:
    """Node cost: a FLOP estimate at a `ShapeHint` (symbolic dims -> rows, seq).

    - GEMMs (linear, mm, addmm, bmm, matmul): ``2*M*K*N`` (+ ``M*N`` for a bias);
    - attention (SDPA, `ChunkAttention`): ``4*B*H*Lq*Lk*D``;
    - adapter sites: per task, on an even share of the tokens ``t``: LoRA ``2*t*r*(K+N) + t*N``,
      IA3 ``t*N``; a task loss: the logits' elements over the task count;
    - views, sizes and asserts: 0; any other op: the elements it writes.

    >>> cost = FlopCost(mux, ShapeHint(rows=4, seq=256))   # doctest: +SKIP
    >>> cost(linear_node)                   # 1024 tokens, 32 -> 32   # doctest: +SKIP
    2097152.0
    """

    name = "flop"

    def __init__(self, mux: MuxGraph, hint: ShapeHint | None = None):
        self.hint = hint or ShapeHint()
        self.sizes = GraphShapes(mux).at(self.hint)
        self.n_tasks = max(1, len(mux.tasks))

    def __call__(self, node: fx.Node) -> float:
        if node.op != "call_function":
            return 0.0
        rec = node.meta.get("muxc")
        if rec is not None and rec.role is Role.ADAPTER:
            return self._site(node, rec)
        if rec is not None and rec.role is Role.LOSS:
            return self.sizes.numel(meta_val(node.args[0])) / self.n_tasks
        p = packet(node.target)
        if p in FREE or node.target is operator.getitem:
            return 0.0
        out = meta_val(node)
        if p in GEMMS and isinstance(out, torch.Tensor):
            k = self.sizes.dim(meta_val(gemm_operands(node)[0]).shape[-1])
            flops = 2.0 * self.sizes.numel(out) * k
            return flops + (self.sizes.numel(out) if has_bias(node) else 0)
        attn = attention_call(node)
        if attn is not None:
            q, k = (meta_val(a) for a in attn[0][:2])
            b, h, lq, d = (self.sizes.dim(x) for x in q.shape[-4:])
            return 4.0 * b * h * lq * self.sizes.dim(k.shape[-2]) * d
        return float(self.sizes.numel(out))

    def _site(self, node: fx.Node, rec) -> float:
        x, out = meta_val(node.args[0]), meta_val(node)
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            return 0.0
        t = self.hint.tokens / self.n_tasks
        k, n = self.sizes.dim(x.shape[-1]), self.sizes.dim(out.shape[-1])
        total = 0.0
        for r in rec.adapters:
            spec, pre = spec_of(r.kind), r.position is Position.IN
            total += t * spec.flops_per_token(k, n, r.rank, pre) + spec.flops_per_call(k, n, r.rank, pre)
        return total


class LatencyCost:
    """Node cost from muxc's cost model: predicted forward + backward seconds at a `ShapeHint`.

    Prices `muxc.plan.summary.summarize_graph`'s per-node work with a `CostModel` (fitted to a
    device profile, else its roofline); per-task ops (adapters, losses) get an even share of
    the hint's rows. Balances pipeline stages by the time they will take.
    """

    name = "s"

    def __init__(
        self, mux: MuxGraph, cost_model: CostModel | None = None, hint: ShapeHint | None = None
    ):
        self.hint = hint or ShapeHint()
        self.cost_model = cost_model if cost_model is not None else CostModel()
        task_rows = self.hint.rows / max(1, len(mux.tasks))
        seconds: dict[str, float] = {}
        seq = self.hint.seq
        for op in summarize_graph(mux).ops:
            rows = task_rows if op.task is not None else self.hint.rows
            for work, backward in ((op.forward, False), (op.backward, True)):
                if work is not None:
                    t = self.cost_model.latency(work.key, work.amount(rows, seq), backward)
                    name = op.node.split("[", 1)[0]  # "chunk_attention_0[kv]": a part of the node
                    seconds[name] = seconds.get(name, 0.0) + t
        self.seconds = seconds

    def __call__(self, node: fx.Node) -> float:
        return self.seconds.get(node.name, 0.0)
