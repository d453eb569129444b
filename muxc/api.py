"""`compile(tasks)` runs the PIPELINE; `Program` trains the compiled tasks together."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from muxc.dot import write_dot
from muxc.dump import dump_history, dump_plan
from muxc.errors import EmptyBatchWarning, NonFiniteWarning, TaskPausedWarning, TaskSpecError
from muxc.explain import Explanation, explain_program
from muxc.frontends.peft import vocab_sizes
from muxc.ir import MuxGraph
from muxc.names import safe_child
from muxc.options import Alignment, Options
from muxc.pipeline import CompileContext, PassRecord, run_pipeline
from muxc.runtime.batch import BatchSpec, check_batches, unlabeled
from muxc.runtime.local import LocalExecutor
from muxc.runtime.training import StepOutcome, TaskState, build_states, nonfinite
from muxc.save import save_task_adapter
from muxc.task import Task

__all__ = ["compile", "Program"]


class Program:
    """A compiled multi-task program.

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
        self.batch_spec = BatchSpec(  # one base model for all tasks: any task's sizes do
            *vocab_sizes(tasks[0].name, tasks[0].model),
            right_padded=ctx.options.alignment is Alignment.CHUNK,
        )
        self.executor = LocalExecutor(mux, ctx.options, partitioned, self.batch_spec)
        # task -> what the latest forward_backward/step did with it (tasks in its batches)
        self.last_step: Mapping[str, StepOutcome] = MappingProxyType({})

    def __repr__(self) -> str:
        return f"Program(tasks={list(self.tasks)}, fusion={self.executor.fusion.value}, {self.mux!r})"

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch; adds each task's gradients to its adapter ``.grad``.

        ``batches``: task name -> HF batch (``input_ids``, ``labels``, optional
        ``attention_mask``); tasks may be left out of a step. Losses equal
        ``model(**batch).loss`` of each task alone.

        Every batch is validated first (`BatchError`, nothing computed). A task whose batch has
        no label token, or that is paused, is left out with a warning (its grads untouched);
        ``last_step`` says what happened to each task. Returns ``{}`` if no task is left.
        """
        run, skipped = self._admit(batches)
        losses = self.executor.forward_backward(run) if run else {}
        values = torch.stack(list(losses.values())).tolist() if losses else []
        outcomes = dict(zip(losses, map(StepOutcome, values)))
        outcomes.update({t: StepOutcome(None, skipped=True, why=w) for t, w in skipped.items()})
        self.last_step = MappingProxyType({t: outcomes[t] for t in self.mux.tasks if t in outcomes})
        return losses

    def step(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """`forward_backward`, then each stepped task's own optimizer/scheduler step and zero_grad.

        A task whose loss or adapter gradients are non-finite does not step: its gradients are
        dropped, its adapter and optimizer state are unchanged, a `NonFiniteWarning` is issued
        and ``last_step`` reports why; after ``Options.max_bad_steps`` such steps in a row it is
        paused (left out of later steps) until `resume_task`.
        """
        losses = self.forward_backward(batches)
        bad = nonfinite(losses, self.states)
        outcomes = dict(self.last_step)
        for name in losses:
            state = self.states[name]
            if name not in bad:
                state.step()
                continue
            state.skip_bad(self.options.max_bad_steps)
            outcomes[name] = StepOutcome(outcomes[name].loss, skipped=True, why=bad[name])
            then = (
                f"paused after {state.bad_steps} such steps in a row; fix its data or learning "
                f"rate, then program.resume_task({name!r})"
                if state.paused
                else f"{state.bad_steps} of {self.options.max_bad_steps} bad steps before a pause"
            )
            warnings.warn(
                NonFiniteWarning(
                    f"task {name!r}: {bad[name]}; its optimizer step was skipped and its adapter "
                    f"left unchanged ({then})"
                ),
                stacklevel=2,
            )
        self.last_step = MappingProxyType(outcomes)
        return losses

    def resume_task(self, name: str) -> None:
        """Let a task paused after repeated non-finite steps train again."""
        if name not in self.states:
            raise TaskSpecError(f"unknown task {name!r}; compiled tasks are {list(self.states)}")
        self.states[name].resume()

    @torch.no_grad()
    def evaluate(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses without gradients (dropout off); tasks without label tokens are left out."""
        run, _ = self._admit(batches, training=False)
        return self.executor.losses(run, training=False) if run else {}

    def _admit(self, batches: Mapping[str, Mapping], training: bool = True):
        """Validate every batch; then ``(batches to run, {left-out task: why})``, warning once
        per left-out task (paused ones only when ``training``; those without label tokens)."""
        check_batches(batches, self.mux.tasks, self.batch_spec)
        skipped: dict[str, str] = {}
        for name in batches:
            if training and self.states[name].paused:
                skipped[name] = "paused"
                warnings.warn(
                    TaskPausedWarning(
                        f"task {name!r} is paused after {self.states[name].bad_steps} non-finite "
                        f"steps and was left out; call program.resume_task({name!r}) to train it"
                    ),
                    stacklevel=3,
                )
        for name in unlabeled({t: b for t, b in batches.items() if t not in skipped}):
            skipped[name] = "no label tokens"
            warnings.warn(
                EmptyBatchWarning(
                    f"task {name!r}: batch has no label tokens (labels are all -100 after the "
                    "causal shift; a label at position 0 predicts nothing), so it was left out "
                    "of this step instead of giving a NaN loss"
                ),
                stacklevel=3,
            )
        return {t: b for t, b in batches.items() if t not in skipped}, skipped

    def explain(self, batches: Mapping[str, Mapping] | None = None) -> Explanation:
        """What is shared, what is per task, which kernels run and why (``str()`` is a table)."""
        if batches is not None:
            check_batches(batches, self.mux.tasks, self.batch_spec)
        return explain_program(self, batches)

    def dump(self, directory: str | Path, batches: Mapping[str, Mapping] | None = None) -> list[Path]:
        """Write ``pass_NN_<name>.txt`` per pass and ``explain.txt``; returns the paths.

        With ``batches``, also the step plan for them: ``schedule.txt`` (per-stage step table,
        simulated times, text Gantt) and ``schedule_gantt.png`` (needs matplotlib).
        """
        directory = Path(directory)
        paths = dump_history(self.history, directory)
        if self.partitioned is not None:
            dot = safe_child(directory, "partition.dot")
            write_dot(self.partitioned, dot)
            paths.append(dot)
        report = self.explain(batches)
        p = safe_child(directory, "explain.txt")
        p.write_text(str(report) + "\n")
        paths.append(p)
        if report.plan is not None:
            paths += dump_plan(report.plan, directory)
        return paths

    def save_adapters(self, directory: str | Path) -> list[Path]:
        """Write each task's adapter to ``<directory>/<task>/`` in PEFT format.

        Every target is checked to lie inside ``directory`` before anything is written.
        """
        targets = {name: safe_child(directory, name) for name in self.tasks}
        return [save_task_adapter(self.tasks[name], path) for name, path in targets.items()]


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
