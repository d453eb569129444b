"""Pipeline schedules of hTasks: IR, builders, simulator and Gantt charts.

- `ir`: `Step`, `StepKind`, `Schedule` (per-stage orders + dependencies, `validate()`,
  `table()`), `ScheduleError`.
- `build`: `build_schedule(micro_batches, stages, policy, chained)` for the policies
  "1f1b" (plain), "interleaved" (1F1B slots filled round-robin from hTasks), "sequential";
  `pipeline_dependencies` (the dependencies as data).
- `simulate`: `simulate(schedule, fwd_time, bwd_time, comm_time, act_bytes)` -> `SimResult`
  (makespan, busy, utilisation, bubble fraction, peak activation memory, step times);
  `time_table` turns ``times[stage][htask]`` into a step-time function; `best_schedule`
  simulates several policies and returns the fastest that fits a memory budget.
- `gantt`: `gantt_text` (fixed width) and `gantt_png` (matplotlib).

>>> s = build_schedule([4, 4], stages=4, policy="interleaved", chained=True)
>>> r = simulate(s, fwd_time=lambda st: 1.0)
>>> round(r.bubble_fraction, 3), r.makespan
(0.273, 22.0)
"""

from muxc.schedule.build import SchedulePolicy, build_schedule, pipeline_dependencies
from muxc.schedule.gantt import GanttUnavailableError, gantt_png, gantt_text
from muxc.schedule.ir import Schedule, ScheduleError, Step, StepKind
from muxc.schedule.simulate import SimResult, best_schedule, simulate, time_table

__all__ = [
    "GanttUnavailableError",
    "Schedule",
    "ScheduleError",
    "SchedulePolicy",
    "SimResult",
    "Step",
    "StepKind",
    "best_schedule",
    "build_schedule",
    "gantt_png",
    "gantt_text",
    "pipeline_dependencies",
    "simulate",
    "time_table",
]
