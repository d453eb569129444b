"""Measured timelines: when each action of a step started and ended, per stage.

A `Timeline` turns into the same `SimResult` the simulator predicts (makespan, busy time,
bubble fraction, per-step start/end), so measured and simulated schedules print and draw alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from muxc.ir import SimResult, Step

__all__ = ["Timeline"]


class Timeline:
    """Start and end (seconds since the timeline began) of each action, per stage."""

    def __init__(self, stages: int):
        self.stages = stages
        self.origin = time.perf_counter()
        self.spans: dict[Step, tuple[float, float]] = {}

    @contextlib.contextmanager
    def record(self, step: Step) -> Iterator[None]:
        start = time.perf_counter() - self.origin
        try:
            yield
        finally:
            self.spans[step] = (start, time.perf_counter() - self.origin)

    def merge(self, other: Timeline, offset: float = 0.0) -> None:
        """Add ``other``'s spans, shifted by ``offset`` seconds (another rank's clock)."""
        for step, (a, b) in other.spans.items():
            self.spans[step] = (a + offset, b + offset)

    def result(self) -> SimResult:
        """The measured run as a `SimResult` (peak memory is not measured: zeros)."""
        start = {s: a for s, (a, _) in self.spans.items()}
        end = {s: b for s, (_, b) in self.spans.items()}
        first = min(start.values(), default=0.0)
        busy = [0.0] * self.stages
        for step, (a, b) in self.spans.items():
            busy[step.stage] += b - a
        makespan = max(end.values(), default=first) - first
        return SimResult(
            stages=self.stages,
            makespan=makespan,
            busy=tuple(busy),
            peak_memory=tuple(0.0 for _ in range(self.stages)),
            start={s: a - first for s, a in start.items()},
            end={s: b - first for s, b in end.items()},
        )
