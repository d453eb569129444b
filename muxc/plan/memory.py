"""Memory model of a multi-task step: shared weights once, per-task training state, activations.

``total = weights + Σ_tasks (adapter + grad + optimizer state) + in_flight * activations``

- weights: the frozen backbone, stored once however many tasks share it.
- per task: its adapter parameters, their gradients (same size) and the optimizer's state
  (AdamW: ``exp_avg`` and ``exp_avg_sq``, 2 × the parameters, in the parameters' dtype).
- activations: bytes autograd keeps for backward in one step (see `muxc.plan.summary`): the
  shared ops' saved tensors for all rows plus each task's own (LoRA inputs, loss
  log-probabilities), times ``in_flight``, the micro-batches whose activations are alive at
  once (1F1B: up to the number of pipeline stages on the first stage).

With recomputation (`muxc.ir.recompute`), ``activations`` is what stays alive from forward to
backward under that mode, plus once the largest recomputed layer's saves (alive while that
layer's backward runs; ``ModelSummary.recompute_peak``).

Assumptions: the caching allocator's fragmentation and the
framework's workspace are not modelled (keep a margin below the device capacity); frozen weights
saved for backward are the weights themselves (not counted twice).

>>> m = MemoryEstimate(weights=100, adapters=10, gradients=10, optimizer=20, activations=60)
>>> m.total, m.fits(200), m.fits(150)
(200, True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from muxc.ir import MuxGraph, StepPlan
from muxc.plan.cost import StepShape
from muxc.plan.ops import CostModelError
from muxc.plan.summary import ModelSummary, as_summary

__all__ = [
    "MemoryEstimate", "estimate_memory", "plan_peak_bytes", "activation_bytes_per_token_per_layer",
]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by category; ``total`` is their sum."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations

    def fits(self, capacity: int) -> bool:
        return self.total <= capacity

    def __repr__(self) -> str:
        mib = 1 << 20
        return (f"MemoryEstimate(total {self.total / mib:.1f} MiB: weights "
                f"{self.weights / mib:.1f}, adapters {self.adapters / mib:.2f}, grads "
                f"{self.gradients / mib:.2f}, optimizer {self.optimizer / mib:.2f}, activations "
                f"{self.activations / mib:.1f})")


def estimate_memory(
    model: ModelSummary | MuxGraph,
    tokens_per_task: Mapping[str, int] | StepShape,
    *,
    seq_len: int | None = None,
    in_flight: int = 1,
    optimizer_states: int = 2,
) -> MemoryEstimate:
    """Bytes needed to train ``model``'s tasks on a step of ``tokens_per_task`` (see module doc).

    Every task of the summary holds training state; only tasks with tokens have activations.
    ``optimizer_states``: optimizer tensors per parameter (AdamW 2, SGD with momentum 1).
    """
    summary = as_summary(model)
    if in_flight < 1 or optimizer_states < 0:
        raise CostModelError(f"need in_flight >= 1 and optimizer_states >= 0, got {in_flight}, "
                             f"{optimizer_states}")
    if isinstance(tokens_per_task, StepShape):
        shape = tokens_per_task
    else:
        if seq_len is None:
            raise CostModelError("estimate_memory needs seq_len with a tokens-per-task mapping")
        shape = StepShape.from_tokens(tokens_per_task, seq_len)
    unknown = sorted(set(shape.rows) - set(summary.tasks))
    if unknown:
        raise CostModelError(f"estimate_memory: tasks {unknown} are not in the summary "
                             f"(tasks {list(summary.tasks)})")
    adapters = sum(summary.adapter_bytes.values())
    acts, peak = 0.0, 0.0
    if shape.total_rows:
        acts = summary.saved(shape.total_rows, shape.seq_len)
        peak = summary.recompute_peak(shape.total_rows, shape.seq_len)
        for task, rows in shape.rows.items():
            if rows:
                acts += summary.saved_per_task[task](rows, shape.seq_len)
    return MemoryEstimate(
        weights=summary.frozen_bytes,
        adapters=adapters,
        gradients=adapters,
        optimizer=optimizer_states * adapters,
        activations=int(round(in_flight * acts + peak)),
    )


def plan_peak_bytes(model: ModelSummary | MuxGraph, plan: StepPlan) -> int:
    """Predicted peak bytes of running ``plan``: what every task holds between steps (weights
    once; each task's adapter, gradients and AdamW state, see `estimate_memory`) plus the
    activations its simulated schedule holds at once, summed over stages (exact for one stage;
    an upper bound when several stages share a process, since their peaks need not coincide)."""
    fixed = estimate_memory(model, {}, seq_len=1).total
    return fixed + int(round(sum(plan.sim.peak_memory)))


def activation_bytes_per_token_per_layer(model: ModelSummary | MuxGraph, seq_len: int) -> float:
    """Saved activation bytes per token per decoder layer at ``seq_len`` (one row, all ops,
    including those outside the layers, spread over the layers)."""
    summary = as_summary(model)
    layers = max(summary.layers, 1)
    return summary.saved(1, seq_len) / seq_len / layers
