"""The plan of one training step: what the planner decides and the runtime executes.

`StepPlan` is the one object `explain(batches)` and `dump(dir, batches)` print and the executor
runs action by action: the hTasks (tasks fused spatially), each hTask's micro-batches (its
chunk steps with chunk alignment, with their layout built once), and the `Schedule` (per
pipeline stage, the ordered forward/backward actions). The planner's predictions ride along
for `explain()`: per-hTask costs, the simulated timeline and the fusion DP's alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muxc.ir.chunks import ChunkLayout
from muxc.ir.schedule import Schedule, SimResult

__all__ = ["GroupCost", "FusionPlan", "HTaskCost", "HTask", "StepPlan"]


@dataclass(frozen=True)
class GroupCost:
    """Predicted cost of running one candidate hTask."""

    work: float  # busy time on one stage over all its micro-batches
    slot: float  # time of one micro-batch on one stage
    activation_bytes: float  # activations one in-flight micro-batch holds
    tokens: int  # tokens of one micro-batch


@dataclass(frozen=True)
class FusionPlan:
    htasks: tuple[tuple[str, ...], ...]
    predicted: float
    alternatives: dict[str, float] = field(default_factory=dict)  # name -> predicted objective
    infeasible: tuple[str, ...] = ()  # alternatives the DP may not pick (past saturation / budget)

    def __str__(self) -> str:
        alts = ", ".join(f"{k}={v * 1e3:.2f}ms{' (not allowed)' if k in self.infeasible else ''}"
                         for k, v in self.alternatives.items())
        return f"hTasks {[list(h) for h in self.htasks]} predicted {self.predicted * 1e3:.2f}ms ({alts})"



@dataclass(frozen=True)
class HTaskCost:
    """One hTask on one pipeline stage: per micro-batch seconds and activation bytes."""

    micro_batches: int
    forward: float
    backward: float
    activation_bytes: float
    tokens: int  # tokens of one micro-batch


@dataclass(frozen=True)
class HTask:
    """Tasks fused spatially: every micro-batch runs their tokens through each frozen op once.

    ``layout`` is the chunk layout (chunk alignment; its steps are the micro-batches), or None
    for pad alignment, where each task's rows are split into ``micro_batches`` parts.
    """

    tasks: tuple[str, ...]
    micro_batches: int
    layout: ChunkLayout | None = field(default=None, repr=False)

    @property
    def chunk_size(self) -> int | None:
        """This hTask's chunk size (None: pad alignment)."""
        return None if self.layout is None else self.layout.chunk_size


@dataclass(frozen=True)
class StepPlan:
    """One step's plan (see module doc). ``schedule`` steps name hTasks by index in ``htask_plans``."""

    htask_plans: tuple[HTask, ...]
    costs: tuple[HTaskCost, ...]
    chunk_size: int | None  # the step's chunk size; hTasks may run their own (`chunk_sizes`)
    stages: int
    schedule: Schedule
    sim: SimResult
    fusion: FusionPlan | None  # the DP's choice and alternatives (fusion="auto")
    tokens_computed: int
    real_tokens: int

    @property
    def chunk_sizes(self) -> tuple[int | None, ...]:
        """Each hTask's own chunk size (``chunk_size`` is the step's default; without a fixed
        ``chunk_size`` option the planner picks one per hTask)."""
        return tuple(h.chunk_size for h in self.htask_plans)

    @property
    def htasks(self) -> list[list[str]]:
        """The hTasks' task names, in plan order."""
        return [list(h.tasks) for h in self.htask_plans]

    @property
    def ineffective_token_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.tokens_computed, 1)

    @property
    def predicted_step_ms(self) -> float:
        return self.sim.makespan * 1e3

    @property
    def bubble_fraction(self) -> float:
        return self.sim.bubble_fraction

    def actions(self, stage: int) -> tuple:
        """Stage ``stage``'s ordered actions (`Step`s): what the executor runs there, in order."""
        return tuple(self.schedule.order[stage])
