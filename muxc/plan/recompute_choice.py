"""What ``recompute="auto"`` keeps: the outputs that cost the most time to recompute per byte.

Under ``auto`` every op of a recomputed decoder layer runs again in backward unless its output
is kept (`muxc.ir.recompute`). Only compute-bound outputs are candidates (`keepable`: frozen
GEMMs, matmuls, attention; memory-bound ops cost about their bytes to recompute, so keeping
them never pays). `choose_kept` prices, with the cost model, each candidate's forward time
``t`` at a reference step shape and the bytes ``m`` keeping it costs, then keeps candidates in
decreasing ``t / m`` (the time each kept byte buys back) until the predicted step time is
within ``AUTO_MAX_SLOWDOWN`` of the step without recomputation. This minimises what is kept
under that time bound (greedy knapsack by value per byte). When recomputing every layer
already fits the bound, nothing but each layer's inputs is kept (``auto`` = ``layers``).

What ranks first depends on the model: attention's recompute time per kept byte grows with
the sequence (``~ s`` flops per output element), a GEMM's with its input width (``~ K``);
pointwise ops and adapter kernels always run again.

>>> choose_kept(program.mux, RecomputePlan(Recompute.AUTO)).keep   # doctest: +SKIP
frozenset({'scaled_dot_product_attention', 'scaled_dot_product_attention_1'})
"""

from __future__ import annotations

import dataclasses

from muxc.ir import MuxGraph
from muxc.ir.recompute import Recompute, RecomputePlan
from muxc.plan.cost import CostModel, StepShape, estimate_step
from muxc.plan.summary import KV, ModelSummary, summarize_graph

__all__ = ["AUTO_MAX_SLOWDOWN", "REFERENCE_SEQ", "choose_kept", "recompute_seconds"]

AUTO_MAX_SLOWDOWN = 1.3
"""Predicted step time ``auto`` may take, relative to the step without recomputation."""

REFERENCE_SEQ = 512
"""Sequence length (one row per task) the choice is priced at: a typical fine-tuning sample."""


def _node(op_name: str) -> str:
    return op_name.split("[", 1)[0]


def recompute_seconds(summary: ModelSummary, plan: RecomputePlan, cost: CostModel,
                      shape: StepShape) -> dict[str, float]:
    """Forward seconds of each graph node in a layer ``plan`` recomputes (its costs summed,
    adapters' included): what running it again in backward adds to the step."""
    out: dict[str, float] = {}
    b = float(shape.total_rows)
    s = float(shape.seq_len)
    past = 0.0  # the reference shape attends to its own chunk only: no kept K/V
    for o in summary.ops:
        if o.forward is None or not plan.checkpoints(o.layer):
            continue
        rows = b if o.task is None else float(shape.rows.get(o.task, 0))
        if rows == 0:
            continue
        scale = past if o.kv is KV.PAST else 1.0
        if scale == 0:
            continue
        t = cost.latency(o.forward.key, o.forward.amount(rows, s) * scale) + cost.call_overhead
        out[_node(o.node)] = out.get(_node(o.node), 0.0) + t
    return out


def choose_kept(mux: MuxGraph, plan: RecomputePlan, cost: CostModel | None = None,
                seq_len: int = REFERENCE_SEQ,
                max_slowdown: float = AUTO_MAX_SLOWDOWN) -> RecomputePlan:
    """``plan`` (an ``auto`` one) with ``keep`` chosen as the module doc says; other plans and
    plans that already name their kept nodes are returned as they are."""
    if plan.mode is not Recompute.AUTO or plan.keep is not None:
        return plan
    probe = dataclasses.replace(plan, keep=frozenset())
    summary = summarize_graph(mux, recompute=probe)
    if cost is None:
        cost = CostModel.for_device(next(iter(mux.tensors.values())).device)
    shape = StepShape({t: 1 for t in summary.tasks}, seq_len)
    base = estimate_step(summary, shape, cost=cost).total  # recompute changes memory only
    seconds = recompute_seconds(summary, plan, cost, shape)
    overhead = sum(seconds.values())
    b, s = float(shape.total_rows), float(seq_len)
    value = {n: seconds.get(n, 0.0) / max(m(b, s), 1.0) for n, m in summary.keepable.items()}
    keep: list[str] = []
    for name in sorted(value, key=lambda n: (-value[n], n)):
        if base + overhead <= max_slowdown * base:
            break
        keep.append(name)
        overhead -= seconds.get(name, 0.0)
    why = (f"{plan.why}; keeps {len(keep)} of {len(value)} compute-bound outputs, predicted "
           f"step time {(base + overhead) / base if base else 1.0:.2f}x without recomputation "
           f"(bound {max_slowdown}x, at {seq_len} tokens per task)")
    return dataclasses.replace(plan, keep=frozenset(keep), why=why)
