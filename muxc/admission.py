"""Admission: a step one tenant could blow up is refused before it runs, not after an OOM.

Two limits, both checked by `Program` after the batches are validated and before any forward:

- ``Options.max_task_tokens``: tokens (rows x sequence length, padding included) one task's
  batch may bring to one step.
- ``Options.memory_budget``: the step plan's predicted peak (`muxc.plan.plan_peak_bytes`:
  weights once, every task's training state, the activations the schedule holds at once). Each
  task is first priced alone, so the error names the task that does not fit by itself; if each
  fits alone but the fused step does not, it names the largest one and says how to split it.

Either raises `AdmissionError` naming the task, its token count and the limit, with nothing run
or changed.
"""

from __future__ import annotations

from collections.abc import Mapping

from muxc.errors import AdmissionError
from muxc.ir import StepPlan
from muxc.plan import Planner, plan_peak_bytes

__all__ = ["task_tokens", "check_tokens", "admit_plan"]

_MIB = 1 << 20


def task_tokens(batch: Mapping) -> int:
    """Tokens ``batch`` brings to a step: rows x sequence length, padding included."""
    return int(batch["input_ids"].numel())


def _shape(batch: Mapping) -> str:
    rows, seq = batch["input_ids"].shape
    return f"{rows} rows x {seq}"


def check_tokens(batches: Mapping[str, Mapping], limit: int | None) -> None:
    """Raise `AdmissionError` for the first task whose batch is over ``limit`` tokens."""
    if limit is None:
        return
    for name, b in batches.items():
        n = task_tokens(b)
        if n > limit:
            raise AdmissionError(
                f"task {name!r}: its batch brings {n} tokens ({_shape(b)}) to this step, over "
                f"Options.max_task_tokens={limit}; split it into batches of at most {limit} "
                "tokens (fewer rows or shorter sequences), or raise max_task_tokens. Nothing "
                "was run"
            )


def admit_plan(planner: Planner, batches: Mapping[str, Mapping], budget: int | None) -> StepPlan:
    """The plan of ``batches``, after checking its predicted peak against ``budget`` bytes
    (None: no check); `AdmissionError` when it is over (see module doc)."""
    if budget is None:
        return planner.plan(batches)
    solo = planner.alone()
    alone = {}
    for name, b in batches.items():
        plan = solo.plan({name: b})
        alone[name] = plan_peak_bytes(planner.summary, plan)
        if alone[name] > budget:
            raise AdmissionError(
                f"task {name!r}: its batch ({task_tokens(b)} tokens, {_shape(b)}) is predicted "
                f"to need {alone[name] / _MIB:.1f} MiB even alone, over Options.memory_budget="
                f"{budget} ({budget / _MIB:.1f} MiB); send it smaller batches (set "
                "max_task_tokens to enforce it) or raise memory_budget. Nothing was run"
            )
    if len(batches) == 1:
        return plan
    plan = planner.plan(batches)
    peak = plan_peak_bytes(planner.summary, plan)
    if peak > budget:
        name = max(batches, key=lambda t: (task_tokens(batches[t]), t))
        fusion = planner.options.fusion.value
        other = "'temporal'" if fusion == "auto" else "'auto' (it plans under the budget) or 'temporal'"
        raise AdmissionError(
            f"this step's plan (hTasks {plan.htasks}) is predicted to need {peak / _MIB:.1f} MiB, "
            f"over Options.memory_budget={budget} ({budget / _MIB:.1f} MiB), though each task "
            f"fits alone; the largest is task {name!r} with {task_tokens(batches[name])} tokens "
            f"({_shape(batches[name])}). Run fewer tasks per step, use fusion={other} (now "
            f"{fusion!r}), or raise memory_budget. Nothing was run"
        )
    return plan
