"""Simulate a schedule on a cost model: makespan, bubbles, utilisation, activation memory.

Event simulation of a `Schedule`: each stage runs its steps in its order; a step starts when
its stage is free and all its dependencies have ended, plus ``comm_time`` for a dependency on
another stage (the activation or gradient send). A forward's activations are held on its
stage from the forward's start until its backward ends.

The paper's closed form, ``(Σ micro-batches + S − 1) · slowest stage``, is
`muxc.plan.iteration.pipeline_iteration_time`; plain 1F1B with uniform times simulates to
exactly that.

>>> from muxc.plan.schedule import build_schedule
>>> s = build_schedule([4], stages=2, policy="1f1b")
>>> r = simulate(s, fwd_time=lambda st: 1.0, bwd_time=lambda st: 2.0)
>>> r
SimResult(makespan 15, bubble 0.2, utilisation [0.8, 0.8], peak memory [2, 1])
>>> r.makespan == (4 + 2 - 1) * (1.0 + 2.0)
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from muxc.ir.schedule import SchedulePolicy
from muxc.plan.schedule import build_schedule
from muxc.ir.schedule import Schedule, ScheduleError, SimResult, Step

__all__ = ["simulate", "time_table", "best_schedule"]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _duration(fn: Callable[[Step], float], step: Step, what: str) -> float:
    value = float(fn(step))
    if not value >= 0.0:  # also rejects NaN
        raise ScheduleError(f"{what} returned {value!r} for {step!r}; times must be >= 0")
    return value


def simulate(
    schedule: Schedule,
    fwd_time: Callable[[Step], float],
    bwd_time: Callable[[Step], float] | None = None,
    comm_time: float = 0.0,
    act_bytes: Callable[[Step], float] | None = None,
) -> SimResult:
    """Run ``schedule`` on the given step times and return its `SimResult`.

    fwd_time, bwd_time: seconds (or any unit) of a forward / backward step; ``bwd_time``
    defaults to ``fwd_time`` (frozen backbone: no weight-gradient GEMMs, so a backward costs
    about one forward; pass the cost model's own numbers when it has them).
    comm_time: added to a dependency on another stage (stage-to-stage send).
    act_bytes: activation bytes a forward step leaves held until its backward ends (default:
    1 per forward, so peak memory counts micro-batches in flight).
    Raises `ScheduleError` if the schedule deadlocks or a time is negative.

    >>> from muxc.plan.schedule import build_schedule
    >>> simulate(build_schedule([1], 2, "1f1b"), lambda s: 1.0, lambda s: 2.0).makespan
    6.0
    """
    if not comm_time >= 0.0:
        raise ScheduleError(f"comm_time must be >= 0, got {comm_time!r}")
    bwd = fwd_time if bwd_time is None else bwd_time
    start: dict[Step, float] = {}
    end: dict[Step, float] = {}
    free = [0.0] * schedule.stages
    busy = [0.0] * schedule.stages
    for step in schedule.execution_order():
        s = step.stage
        t = free[s]
        for dep in schedule.deps_of(step):
            ready = end[dep] + (comm_time if dep.stage != s else 0.0)
            t = max(t, ready)
        if step.is_forward:
            d = _duration(fwd_time, step, "fwd_time")
        else:
            d = _duration(bwd, step, "bwd_time")
        start[step], end[step] = t, t + d
        free[s] = t + d
        busy[s] += d
    peak = []
    for s in range(schedule.stages):
        events: list[tuple[float, int, float]] = []  # (time, 0 = free first, +-bytes)
        for step in schedule.order[s]:
            if step.is_forward:
                size = 1.0 if act_bytes is None else float(act_bytes(step))
                if not size >= 0.0:
                    raise ScheduleError(f"act_bytes returned {size!r} for {step!r}; need >= 0")
                events.append((start[step], 1, size))
                events.append((end[step.partner], 0, -size))
        held = high = 0.0
        for _, _, delta in sorted(events, key=lambda e: (e[0], e[1])):
            held += delta
            high = max(high, held)
        peak.append(high)
    makespan = max(end.values(), default=0.0)
    return SimResult(
        stages=schedule.stages,
        makespan=makespan,
        busy=tuple(busy),
        peak_memory=tuple(peak),
        start=MappingProxyType(start),
        end=MappingProxyType(end),
    )


def time_table(times: Sequence[Sequence[float]]) -> Callable[[Step], float]:
    """A step-time function from ``times[stage][htask]`` (time of one micro-batch).

    >>> from muxc.ir.schedule import StepKind
    >>> time_table([[1.0, 2.0], [3.0, 4.0]])(Step(1, StepKind.FORWARD, 0, 5))
    3.0
    """
    rows = tuple(tuple(float(t) for t in row) for row in times)

    def lookup(step: Step) -> float:
        try:
            return rows[step.stage][step.htask]
        except IndexError:
            raise ScheduleError(
                f"no time for {step!r}: the table has {len(rows)} stages and "
                f"{[len(r) for r in rows]} hTasks per stage"
            ) from None

    return lookup


def best_schedule(
    micro_batches: Sequence[int],
    stages: int,
    chained: bool,
    fwd_time: Callable[[Step], float],
    bwd_time: Callable[[Step], float] | None = None,
    comm_time: float = 0.0,
    act_bytes: Callable[[Step], float] | None = None,
    memory_budget: float | None = None,
    policies: Sequence[SchedulePolicy | str] = ("interleaved", "1f1b"),
) -> tuple[Schedule, SimResult]:
    """Build each policy's schedule, simulate it, return the fastest whose every stage's peak
    activation memory is within ``memory_budget`` (same unit as ``act_bytes``; None: no limit).

    Ties on makespan go to the lower peak memory, then to the earlier policy in ``policies``.
    Neither policy always wins: interleaving removes the chained-chunk bubbles but holds more
    activations; with independent micro-batches of unequal hTask sizes, hTask order can be
    faster. Raises `ScheduleError` listing each policy's peak when none fits.

    >>> s, r = best_schedule([4, 4], stages=4, chained=True, fwd_time=lambda st: 1.0)
    >>> s.policy, r.makespan, r.peak_memory[0]
    ('interleaved', 22.0, 8.0)
    >>> best_schedule([4, 4], 4, True, lambda st: 1.0, memory_budget=7)[0].policy
    '1f1b'
    """
    if not policies:
        raise ScheduleError("best_schedule needs at least one policy")
    tried = []
    for rank, policy in enumerate(policies):
        schedule = build_schedule(micro_batches, stages, policy, chained)
        result = simulate(schedule, fwd_time, bwd_time, comm_time, act_bytes)
        tried.append((result.makespan, max(result.peak_memory), rank, schedule, result))
    fitting = [t for t in tried if memory_budget is None or t[1] <= memory_budget]
    if not fitting:
        peaks = ", ".join(f"{t[3].policy}: {_fmt(t[1])}" for t in tried)
        raise ScheduleError(
            f"no schedule of micro-batches {list(micro_batches)} on {stages} stages fits the "
            f"activation memory budget {_fmt(memory_budget)} per stage (peaks: {peaks}); "
            "use smaller micro-batches or chunks, fewer tasks per hTask, or more stages"
        )
    _, _, _, schedule, result = min(fitting, key=lambda t: (t[0], t[1], t[2]))
    return schedule, result
