"""Schedule IR: per pipeline stage, an ordered list of steps, with dependencies as data.

A `Step` is one forward or backward of one micro-batch (or chunk step) of one hTask on one
stage, optionally of one subgraph. A `Schedule` holds each stage's order and, for every step,
the steps it needs finished first. `Schedule.validate` checks the order is executable: it
replays the stages in their order, running a stage's next step only once its dependencies
ran, and names the blocked steps if no stage can move (a deadlock).

>>> f0, f1 = Step(0, StepKind.FORWARD, 0, 0), Step(1, StepKind.FORWARD, 0, 0)
>>> b1, b0 = Step(1, StepKind.BACKWARD, 0, 0), Step(0, StepKind.BACKWARD, 0, 0)
>>> s = Schedule(2, ((f0, b0), (f1, b1)), {f1: (f0,), b1: (f1,), b0: (b1, f0)})
>>> s.validate()
Schedule(custom, 2 stages, 1 hTask, micro-batches [1], 4 steps)
>>> print(s.table())
stage | 0    1
    0 | F0.0 B0.0
    1 | F0.0 B0.0
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from muxc.errors import MuxcError, parse_enum

__all__ = ["ScheduleError", "SchedulePolicy", "StepKind", "Step", "Schedule", "SimResult"]


class ScheduleError(MuxcError):
    """A schedule is malformed or its order cannot run (a dependency would deadlock)."""


class SchedulePolicy(str, enum.Enum):
    """How a stage orders the hTasks' micro-batches (see `muxc.plan.schedule`)."""

    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    SEQUENTIAL = "sequential"

    @classmethod
    def parse(cls, value: SchedulePolicy | str) -> SchedulePolicy:
        return parse_enum(cls, value, "policy", ScheduleError)


class StepKind(enum.Enum):
    """Forward or backward of one micro-batch on one stage."""

    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True)
class Step:
    """One forward or backward of micro-batch ``micro_batch`` of hTask ``htask`` on ``stage``.

    With chunk alignment a micro-batch is one chunk step of the hTask. ``subgraph`` names one
    subgraph of the stage when steps are that fine (None: the whole stage).

    >>> Step(1, StepKind.BACKWARD, htask=2, micro_batch=3)
    Step(B s1 h2 m3)
    >>> Step(1, StepKind.FORWARD, 2, 3).label, Step(1, StepKind.FORWARD, 2, 3).partner
    ('F2.3', Step(B s1 h2 m3))
    """

    stage: int
    kind: StepKind
    htask: int
    micro_batch: int
    subgraph: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StepKind):
            raise ScheduleError(f"Step.kind must be a StepKind, got {self.kind!r}")
        for name in ("stage", "htask", "micro_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleError(f"Step.{name} must be an int >= 0, got {value!r}")
        sub = self.subgraph
        if sub is not None and (isinstance(sub, bool) or not isinstance(sub, int) or sub < 0):
            raise ScheduleError(f"Step.subgraph must be an int >= 0 or None, got {self.subgraph!r}")

    @property
    def is_forward(self) -> bool:
        return self.kind is StepKind.FORWARD

    @property
    def label(self) -> str:
        """Short label without the stage: ``F<htask>.<micro_batch>`` (``/g<subgraph>``)."""
        sub = "" if self.subgraph is None else f"/g{self.subgraph}"
        return f"{self.kind.value}{self.htask}.{self.micro_batch}{sub}"

    @property
    def partner(self) -> Step:
        """The backward of this forward, or the forward of this backward."""
        other = StepKind.BACKWARD if self.is_forward else StepKind.FORWARD
        return Step(self.stage, other, self.htask, self.micro_batch, self.subgraph)

    def __repr__(self) -> str:
        sub = "" if self.subgraph is None else f" g{self.subgraph}"
        return f"Step({self.kind.value} s{self.stage} h{self.htask} m{self.micro_batch}{sub})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class Schedule:
    """Each stage's order of steps plus the dependencies between steps.

    stages: number of pipeline stages; ``order[s]`` is stage ``s``'s steps in run order.
    deps: for a step, the steps that must finish before it starts (absent: none).
    policy, micro_batches, chained: how it was built (for dumps; "custom" when by hand).

    A schedule is checked by `validate()`, not on construction, so a bad hand-made one can be
    built, dumped and then rejected with a message naming the blocked steps.
    """

    stages: int
    order: tuple[tuple[Step, ...], ...]
    deps: Mapping[Step, tuple[Step, ...]] = field(hash=False)
    policy: str = "custom"
    micro_batches: tuple[int, ...] = ()
    chained: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ScheduleError(f"Schedule.stages must be an int >= 1, got {self.stages!r}")
        order = tuple(tuple(row) for row in self.order)
        if len(order) != self.stages:
            raise ScheduleError(
                f"Schedule has {self.stages} stages but {len(order)} stage orders; "
                "give exactly one (possibly empty) order per stage"
            )
        object.__setattr__(self, "order", order)
        deps = {step: tuple(before) for step, before in self.deps.items()}
        object.__setattr__(self, "deps", MappingProxyType(deps))
        if not self.micro_batches:
            counts: dict[int, int] = {}
            for step in self.steps():
                counts[step.htask] = max(counts.get(step.htask, 0), step.micro_batch + 1)
            mbs = tuple(counts.get(h, 0) for h in range(max(counts, default=-1) + 1))
            object.__setattr__(self, "micro_batches", mbs)
        else:
            object.__setattr__(self, "micro_batches", tuple(self.micro_batches))

    # ---- accessors ----------------------------------------------------------------------

    def steps(self) -> Iterator[Step]:
        """Every step, stage by stage, in order."""
        for row in self.order:
            yield from row

    @property
    def num_steps(self) -> int:
        return sum(len(row) for row in self.order)

    @property
    def htasks(self) -> int:
        return len(self.micro_batches)

    def deps_of(self, step: Step) -> tuple[Step, ...]:
        """The steps that must finish before ``step`` starts."""
        return self.deps.get(step, ())

    # ---- checks -------------------------------------------------------------------------

    def _check_well_formed(self) -> None:
        seen: dict[Step, int] = {}
        for s, row in enumerate(self.order):
            for i, step in enumerate(row):
                if step.stage != s:
                    raise ScheduleError(
                        f"{step!r} is in stage {s}'s order at position {i} but belongs to "
                        f"stage {step.stage}; put each step in its own stage's order"
                    )
                if step in seen:
                    raise ScheduleError(
                        f"{step!r} appears twice in stage {s}'s order (positions {seen[step]} "
                        f"and {i}); each step runs exactly once"
                    )
                seen[step] = i
        for step, before in self.deps.items():
            if step not in seen:
                raise ScheduleError(f"deps names {step!r}, which no stage order contains")
            for dep in before:
                if dep not in seen:
                    raise ScheduleError(
                        f"{step!r} depends on {dep!r}, which no stage order contains; "
                        "add it to its stage's order or drop the dependency"
                    )
                if dep == step:
                    raise ScheduleError(f"{step!r} depends on itself")
        for step, i in seen.items():
            partner = step.partner
            if partner not in seen:
                raise ScheduleError(
                    f"{step!r} has no {partner!r}: every forward needs exactly one backward on "
                    "the same stage (its activations are held until then)"
                )
            if step.is_forward and seen[partner] < i:
                raise ScheduleError(
                    f"stage {step.stage} runs {partner!r} (position {seen[partner]}) before its "
                    f"forward {step!r} (position {i})"
                )

    def execution_order(self) -> tuple[Step, ...]:
        """One global order that runs every stage in its own order and respects every dependency.

        Replays the schedule: repeatedly runs, on each stage in turn, the stage's next steps
        whose dependencies have run. Raises `ScheduleError` naming each stage's blocked step and
        what it waits for when no stage can move.
        """
        self._check_well_formed()
        heads = [0] * self.stages
        done: set[Step] = set()
        out: list[Step] = []
        total = self.num_steps
        while len(out) < total:
            moved = False
            for s, row in enumerate(self.order):
                while heads[s] < len(row) and all(d in done for d in self.deps_of(row[heads[s]])):
                    step = row[heads[s]]
                    done.add(step)
                    out.append(step)
                    heads[s] += 1
                    moved = True
            if not moved:
                blocked = []
                for s, row in enumerate(self.order):
                    if heads[s] < len(row):
                        step = row[heads[s]]
                        waits = [d for d in self.deps_of(step) if d not in done]
                        blocked.append(
                            f"stage {s} position {heads[s]}: {step!r} waits for "
                            + ", ".join(repr(d) for d in waits)
                        )
                raise ScheduleError(
                    f"{self!r} deadlocks after {len(out)} of {total} steps; blocked: "
                    + "; ".join(blocked)
                    + ". Reorder the stage orders so every dependency runs earlier, or build "
                    "the schedule with muxc.plan.build_schedule"
                )
        return tuple(out)

    def validate(self) -> Schedule:
        """Check the schedule is well formed and runs without deadlock; returns ``self``."""
        self.execution_order()
        return self

    # ---- dumps --------------------------------------------------------------------------

    def table(self, deps: bool = False) -> str:
        """Fixed-width grid: one row per stage, one column per position; ``F<h>.<m>`` labels.

        With ``deps=True``, a listing of every step's dependencies follows the grid.
        """
        width = max((len(step.label) for step in self.steps()), default=1)
        cols = max((len(row) for row in self.order), default=0)
        width = max(width, len(str(max(cols - 1, 0))))
        head = "stage | " + " ".join(str(i).ljust(width) for i in range(cols))
        lines = [head.rstrip()]
        for s, row in enumerate(self.order):
            cells = " ".join(step.label.ljust(width) for step in row)
            lines.append(f"{s:>5} | {cells}".rstrip())
        if deps:
            lines.append("")
            lines.append("step            | needs")
            for step in self.steps():
                needs = ", ".join(repr(d) for d in self.deps_of(step)) or "-"
                lines.append(f"{step!r:<15} | {needs}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        chained = ", chained" if self.chained else ""
        return (
            f"Schedule({self.policy}, {_plural(self.stages, 'stage')}, "
            f"{_plural(self.htasks, 'hTask')}, micro-batches {list(self.micro_batches)}"
            f"{chained}, {self.num_steps} steps)"
        )


def _as_counts(micro_batches: Sequence[int]) -> tuple[int, ...]:
    """Validated per-hTask micro-batch counts."""
    counts = tuple(micro_batches)
    if not counts:
        raise ScheduleError("need at least one hTask; got no micro-batch counts")
    for h, m in enumerate(counts):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ScheduleError(
                f"hTask {h} has micro-batch count {m!r}; every hTask needs an int >= 1 "
                f"(counts given: {list(counts)})"
            )
    return counts


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class SimResult:
    """What `simulate` predicts for one iteration of a schedule (time in the cost model's unit).

    makespan: end of the last step. busy: per stage, summed step time. peak_memory: per stage,
    the most activation bytes held at once (micro-batches in flight when no sizes were given).
    start, end: per step.
    """

    stages: int
    makespan: float
    busy: tuple[float, ...]
    peak_memory: tuple[float, ...]
    start: Mapping[Step, float] = field(hash=False, repr=False)
    end: Mapping[Step, float] = field(hash=False, repr=False)

    @property
    def utilisation(self) -> tuple[float, ...]:
        """Per stage, busy time / makespan (1.0 for an empty zero-length run)."""
        if self.makespan <= 0:
            return tuple(1.0 for _ in self.busy)
        return tuple(b / self.makespan for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """``1 − Σ busy / (stages · makespan)``: the idle share of the stages' time."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (self.stages * self.makespan)

    def table(self) -> str:
        """Fixed-width per-stage table plus a summary line."""
        lines = [
            f"makespan {_fmt(self.makespan)}, bubble fraction {self.bubble_fraction:.3f}",
            "stage | busy       | utilisation | idle       | peak memory",
        ]
        for s in range(self.stages):
            lines.append(
                f"{s:>5} | {_fmt(self.busy[s]):<10} | {self.utilisation[s]:<11.3f} | "
                f"{_fmt(self.makespan - self.busy[s]):<10} | {_fmt(self.peak_memory[s])}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        util = ", ".join(f"{u:.3g}" for u in self.utilisation)
        mem = ", ".join(_fmt(m) for m in self.peak_memory)
        return (
            f"SimResult(makespan {_fmt(self.makespan)}, bubble {self.bubble_fraction:.3g}, "
            f"utilisation [{util}], peak memory [{mem}])"
        )
