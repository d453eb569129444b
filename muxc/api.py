"""`compile(tasks)` runs the PIPELINE; `Program` trains the compiled tasks together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from muxc.dump.dot import write_dot
from muxc.dump import dump_history, dump_measured, dump_plan
from muxc.explain import Explanation, explain_program
from muxc.ir import MuxGraph
from muxc.options import Options
from muxc.pipeline import CompileContext, CompileState, PassRecord, run_pipeline
from muxc.ir import SimResult, StepPlan
from muxc.plan import Planner
from muxc.runtime.batch import check_batches
from muxc.runtime.distributed import StageExecutor, join_stage_group
from muxc.runtime.local import LocalExecutor
from muxc.runtime.training import TaskState, build_states
from muxc.save import save_task_adapter
from muxc.task import Task

__all__ = ["compile", "Program"]


class Program:
    """A compiled multi-task program.

    >>> program = muxc.compile(tasks)                       # doctest: +SKIP
    >>> program.forward_backward({"a": batch_a, "b": batch_b})  # doctest: +SKIP
    {'a': tensor(4.85), 'b': tensor(4.87)}
    """

    def __init__(self, state: CompileState, options: Options, history: list[PassRecord]):
        """From the pipeline's final ``state``; ``history`` is its pass records."""
        mux: MuxGraph = state.mux_graph
        self.tasks = {t.name: t for t in state.tasks}
        self.mux = mux
        self.options = options
        self.history = history
        self.kernel_plan = state.kernel_plan
        self.sharing = dict(state.sharing)
        records = {t: [] for t in mux.tasks}
        for tg in mux.sources.values():
            records[tg.task] = list(tg.adapters)
        self.adapters = records
        self.states: dict[str, TaskState] = build_states(list(state.tasks), records)
        self.partitioned = state.partitioned
        self.planner = Planner(mux, options)
        self.last_plan: StepPlan | None = None  # the plan the last step ran
        self.measured: SimResult | None = None  # the last step's measured timeline
        self.stage_group = None
        if options.stages > 1:
            device = next(iter(mux.tensors.values())).device
            self.stage_group = join_stage_group(options.stages, options.pipeline_timeout, device)
        if self.stage_group is None:
            self.executor = LocalExecutor(mux, state.partitioned, options.kernel_impl)
        else:
            self.planner.fusion  # priced on the whole graph before other stages' weights go
            self.executor = StageExecutor(mux, state.partitioned, options.kernel_impl, self.stage_group)
            self.executor.release_unowned([t.model for t in state.tasks])

    @property
    def rank(self) -> int:
        """This process's pipeline stage (0 when every stage runs in this process)."""
        return 0 if self.stage_group is None else self.stage_group.rank

    def __repr__(self) -> str:
        return f"Program(tasks={list(self.tasks)}, fusion={self.options.fusion.value}, {self.mux!r})"

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch; adds each task's gradients to its adapter ``.grad``.

        ``batches``: task name -> HF batch (``input_ids``, ``labels``, optional
        ``attention_mask``); tasks may be left out of a step. Losses equal
        ``model(**batch).loss`` of each task alone.
        """
        plan = self.plan(batches)
        self.last_plan = plan
        losses = self.executor.run(plan, batches, training=True)
        if self.stage_group is None:
            self.measured = self.executor.timeline.result()
        else:
            self.measured = self.executor.gather_timeline().result()
        return losses

    def step(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """`forward_backward`, then each stepped task's own optimizer/scheduler step and zero_grad."""
        losses = self.forward_backward(batches)
        for name in losses:
            self.states[name].step()
        return losses

    @torch.no_grad()
    def evaluate(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses without gradients (dropout off)."""
        plan = self.plan(batches)
        return self.executor.run(plan, batches, training=False, backward=False)

    def plan(self, batches: Mapping[str, Mapping]) -> StepPlan:
        """The `StepPlan` for ``batches``: hTasks, micro-batches and the per-stage ordered actions
        that `forward_backward` runs (and `explain(batches)` prints)."""
        check_batches(batches, self.mux.tasks)
        return self.planner.plan(batches)

    def explain(self, batches: Mapping[str, Mapping] | None = None) -> Explanation:
        """What is shared, what is per task, which kernels run and why (``str()`` is a table)."""
        return explain_program(self, batches)

    def dump(self, directory: str | Path, batches: Mapping[str, Mapping] | None = None) -> list[Path]:
        """Write ``pass_NN_<name>.txt`` per pass and ``explain.txt``; returns the paths.

        With ``batches``, also the step plan for them: ``schedule.txt`` (per-stage step table,
        simulated times, text Gantt) and ``schedule_gantt.png`` (needs matplotlib); after a step,
        the measured timeline of the last step beside it (``schedule_measured.txt``,
        ``schedule_measured_gantt.png``; all ranks gathered). With stages on several processes,
        only rank 0 writes (every rank may call it).
        """
        if self.rank != 0:
            return []
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
        if self.last_plan is not None and self.measured is not None:
            paths += dump_measured(self.last_plan, self.measured, directory)
        return paths

    def save_adapters(self, directory: str | Path) -> list[Path]:
        """Write each task's adapter to ``<directory>/<task>/`` in PEFT format.

        With stages on several processes this is collective (call it on every rank): each
        adapter tensor is first copied from the rank that trains it, then rank 0 writes.
        """
        if self.stage_group is not None:
            names = {n: t for n, t in self.mux.tensors.items() if t.requires_grad}
            self.executor.share_params(names)
            if self.rank != 0:
                return []
        return [save_task_adapter(t, Path(directory) / name) for name, t in self.tasks.items()]


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
    return Program(state, options, history)
