"""`plan_step`: the full plan of one step for given batches, for `explain()` and dumps.

hTasks (from the executor), each hTask's micro-batches (its chunk steps with
``alignment="chunk"``, else ``micro_batches``), per-stage times from the cost model, and the
pipeline schedule that interleaves hTasks (`muxc.plan.simulate.best_schedule`), simulated for
makespan, bubble fraction and peak activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from muxc.options import Alignment, Fusion
from muxc.plan.fusion_dp import FusionPlan
from muxc.plan.fusion import HTaskCost, loads_of
from muxc.ir.schedule import Schedule
from muxc.plan.simulate import SimResult, best_schedule, time_table

__all__ = ["StepPlan", "plan_step"]


@dataclass(frozen=True)
class StepPlan:
    htasks: list[list[str]]
    costs: list[HTaskCost]
    chunk_size: int | None
    stages: int
    schedule: Schedule
    sim: SimResult
    fusion: FusionPlan | None  # the DP's choice and alternatives (fusion="auto")
    tokens_computed: int
    real_tokens: int

    @property
    def ineffective_token_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.tokens_computed, 1)

    @property
    def predicted_step_ms(self) -> float:
        return self.sim.makespan * 1e3

    @property
    def bubble_fraction(self) -> float:
        return self.sim.bubble_fraction


def plan_step(executor, batches: Mapping[str, Mapping]) -> StepPlan:
    """Plan one step of ``batches`` as ``executor`` would run it (does not run it)."""
    groups = [g for g in executor.groups(batches) if any(t in batches for t in g)]
    chunk = executor.chunk_size_for(batches) if executor.alignment is Alignment.CHUNK else None
    loads = loads_of({t: b for t, b in batches.items() if t in executor.mux.tasks})
    planner = executor.planner
    costs = []
    for g in groups:
        present = tuple(t for t in g if t in batches)
        steps = len(executor.layout(batches, present).steps) if chunk is not None else None
        costs.append(planner.price(loads, present, chunk, micro_batches=steps))
    stages = executor.stages
    fwd = time_table([[c.forward for c in costs]] * stages)
    bwd = time_table([[c.backward for c in costs]] * stages)
    act = time_table([[c.activation_bytes for c in costs]] * stages)
    schedule, sim = best_schedule([c.micro_batches for c in costs], stages, chunk is not None, fwd, bwd, act_bytes=act)
    computed, real = executor.token_stats(batches)
    return StepPlan(
        htasks=[[t for t in g if t in batches] for g in groups],
        costs=costs,
        chunk_size=chunk,
        stages=stages,
        schedule=schedule,
        sim=sim,
        fusion=executor.last_plan if executor.fusion is Fusion.AUTO else None,
        tokens_computed=computed,
        real_tokens=real,
    )
