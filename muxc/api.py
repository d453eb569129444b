"""`compile(tasks)` runs the PIPELINE; `Program` trains the compiled tasks together."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path

import torch

from muxc.dot import write_dot
from muxc.dump import dump_history, dump_plan
from muxc.errors import OptionsError
from muxc.explain import Explanation, explain_program
from muxc.ir import MuxGraph
from muxc.options import Options
from muxc.passes import select_kernels
from muxc.pipeline import CompileContext, PassRecord, run_pipeline
from muxc.runtime.local import LocalExecutor
from muxc.runtime.training import TaskState, build_states
from muxc.save import save_task_adapter
from muxc.task import Task

__all__ = ["compile", "Program", "RUN_TIME_OPTIONS"]

# Options read only when a step runs: `Program.with_options` may change these without
# recompiling. The others (alignment, stages, verify) act while compiling.
RUN_TIME_OPTIONS = ("fusion", "chunk_size", "micro_batches", "kernel_impl", "memory_budget", "cost_model")


class Program:
    """A compiled multi-task program (examples not run as doctests: they need PEFT models).

    >>> program = muxc.compile(tasks)                       # doctest: +SKIP
    >>> program.forward_backward({"a": batch_a, "b": batch_b})  # doctest: +SKIP
    {'a': tensor(4.85), 'b': tensor(4.87)}
    """

    def __init__(self, tasks: list[Task], mux: MuxGraph, ctx: CompileContext, history: list[PassRecord], kernel_plan,
                 partitioned=None):
        self.tasks = {t.name: t for t in tasks}
        self.mux = mux
        self.options = ctx.options
        self.history = history
        self.kernel_plan = kernel_plan
        self.sharing = dict(ctx.sharing)
        records = {t: [] for t in mux.tasks}
        for tg in mux.sources.values():
            records[tg.task] = list(tg.adapters)
        self.adapters = records
        self.states: dict[str, TaskState] = build_states(tasks, records)
        self.partitioned = partitioned
        self.executor = LocalExecutor(mux, ctx.options, partitioned)

    def __repr__(self) -> str:
        return f"Program(tasks={list(self.tasks)}, fusion={self.executor.fusion.value}, {self.mux!r})"

    def with_options(self, **changes) -> Program:
        """A Program on this one's compiled graph that runs with changed run-time options.

        The new Program shares the compiled graph, the tasks, their adapters and their training
        states (optimizers, schedulers) with this one; only how steps run changes. Run-time
        options: ``fusion``, ``chunk_size``, ``micro_batches``, ``kernel_impl``,
        ``memory_budget``, ``cost_model``. Changing ``alignment``, ``stages`` or ``verify``
        raises `OptionsError` (they act while compiling: compile again instead). Gradients
        accumulate across programs as across calls: zero them between runs you compare.
        Example (not run as a doctest: it needs a compiled program):

        >>> temporal = program.with_options(fusion="temporal")  # doctest: +SKIP
        >>> temporal.options.fusion, temporal.mux is program.mux  # doctest: +SKIP
        (<Fusion.TEMPORAL: 'temporal'>, True)
        """
        known = {f.name for f in dataclasses.fields(Options)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {unknown}; run-time options: {list(RUN_TIME_OPTIONS)}")
        fixed = sorted(n for n in set(changes) - set(RUN_TIME_OPTIONS)
                       if _plain(changes[n]) != _plain(getattr(self.options, n)))
        if fixed:
            asked = ", ".join(
                f"{n}={_plain(changes[n])!r} (compiled with {_plain(getattr(self.options, n))!r})" for n in fixed
            )
            raise OptionsError(
                f"with_options cannot change compile-time option(s) {asked}: they act while "
                f"compiling (tracing, partitioning, checks); compile again with "
                f"muxc.compile(tasks, muxc.Options(...)). with_options changes only {list(RUN_TIME_OPTIONS)}"
            )
        options = dataclasses.replace(self.options, **changes)  # validates the combination
        program = object.__new__(Program)
        program.__dict__.update(self.__dict__)  # same graph, tasks, adapters, states, history
        program.options = options
        # kernel_impl is chosen per op kind like compile does; a forced impl that cannot run raises
        program.kernel_plan = select_kernels(self.mux, CompileContext(options=options))
        program.executor = LocalExecutor(self.mux, options, self.partitioned)
        return program

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch; adds each task's gradients to its adapter ``.grad``.

        ``batches``: task name -> HF batch (``input_ids``, ``labels``, optional
        ``attention_mask``); tasks may be left out of a step. Losses equal
        ``model(**batch).loss`` of each task alone.
        """
        return self.executor.forward_backward(batches)

    def step(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """`forward_backward`, then each stepped task's own optimizer/scheduler step and zero_grad."""
        losses = self.forward_backward(batches)
        for name in losses:
            self.states[name].step()
        return losses

    @torch.no_grad()
    def evaluate(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses without gradients (dropout off)."""
        return self.executor.losses(batches, training=False)

    def explain(self, batches: Mapping[str, Mapping] | None = None) -> Explanation:
        """What is shared, what is per task, which kernels run and why (``str()`` is a table)."""
        return explain_program(self, batches)

    def dump(self, directory: str | Path, batches: Mapping[str, Mapping] | None = None) -> list[Path]:
        """Write ``pass_NN_<name>.txt`` per pass and ``explain.txt``; returns the paths.

        With ``batches``, also the step plan for them: ``schedule.txt`` (per-stage step table,
        simulated times, text Gantt) and ``schedule_gantt.png`` (needs matplotlib).
        """
        directory = Path(directory)
        paths = dump_history(self.history, directory)
        if self.partitioned is not None:
            dot = directory / "partition.dot"
            write_dot(self.partitioned, dot)
            paths.append(dot)
        report = self.explain(batches)
        p = directory / "explain.txt"
        p.write_text(str(report) + "\n")
        paths.append(p)
        if report.plan is not None:
            paths += dump_plan(report.plan, directory)
        return paths

    def save_adapters(self, directory: str | Path) -> list[Path]:
        """Write each task's adapter to ``<directory>/<task>/`` in PEFT format."""
        return [save_task_adapter(t, Path(directory) / name) for name, t in self.tasks.items()]


def _plain(value):
    """An option's value as the user writes it (enums by their value)."""
    return value.value if isinstance(value, Enum) else value


def compile(
    tasks: list[Task],
    options: Options | None = None,
    on_progress: Callable[[str, int, int, str], None] | None = None,
) -> Program:
    """Compile ``tasks`` into one multi-task `Program`.

    ``on_progress(stage, done, total, item)`` is called while tracing (tracing takes about a
    second per task on a small model).
    """
    options = options if options is not None else Options()
    ctx = CompileContext(options=options, on_progress=on_progress)
    state, history = run_pipeline(tasks, ctx)
    return Program(state["tasks"], state["mux_graph"], ctx, history, state["kernel_plan"], state["partitioned"])
