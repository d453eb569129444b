"""`compile(tasks)` runs the PIPELINE; `Program` trains the compiled tasks together."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from muxc.dump.dot import write_dot
from muxc.dump import dump_history, dump_measured, dump_plan
from muxc.errors import EmptyBatchWarning, NonFiniteWarning, TaskPausedWarning, TaskSpecError
from muxc.explain import Explanation, explain_program
from muxc.frontends.peft import vocab_sizes
from muxc.ir import MuxGraph
from muxc.names import safe_child
from muxc.options import Alignment, Options
from muxc.pipeline import CompileContext, CompileState, PassRecord, run_pipeline
from muxc.ir import SimResult, StepPlan
from muxc.plan import Planner
from muxc.runtime.batch import BatchSpec, check_batches, unlabeled
from muxc.runtime.distributed import StageExecutor, join_stage_group
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

    def __init__(self, state: CompileState, options: Options, history: list[PassRecord]):
        """From the pipeline's final ``state``; ``history`` is its pass records."""
        mux: MuxGraph = state.mux_graph
        self.tasks = {t.name: t for t in state.tasks}
        self.mux = mux
        self.options = options
        self.history = history
        self.kernel_plan = state.kernel_plan
        self.sharing = dict(state.sharing)
        records = {t: list(mux.adapters.get(t, ())) for t in mux.tasks}
        self.adapters = records
        self.states: dict[str, TaskState] = build_states(list(state.tasks), records)
        self.partitioned = state.partitioned
        self.planner = Planner(mux, options)
        self.batch_spec = BatchSpec(  # one base model for all tasks: any task's sizes do
            *vocab_sizes(state.tasks[0].name, state.tasks[0].model),
            right_padded=options.alignment is Alignment.CHUNK,
        )
        # task -> what the latest forward_backward/step did with it (tasks in its batches)
        self.last_step: Mapping[str, StepOutcome] = MappingProxyType({})
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

        Every batch is validated first (`BatchError`, nothing computed). A task whose batch has
        no label token, or that is paused, is left out with a warning (its grads untouched);
        ``last_step`` says what happened to each task. Returns ``{}`` if no task is left.
        """
        run, skipped = self._admit(batches)
        losses = {}
        if run:
            plan = self.planner.plan(run)
            self.last_plan = plan
            losses = self.executor.run(plan, run, training=True)
            if self.stage_group is None:
                self.measured = self.executor.timeline.result()
            else:
                self.measured = self.executor.gather_timeline().result()
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
        bad = nonfinite(losses, self.states, self.executor.agree)
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
        if not run:
            return {}
        return self.executor.run(self.planner.plan(run), run, training=False, backward=False)

    def plan(self, batches: Mapping[str, Mapping]) -> StepPlan:
        """The `StepPlan` for ``batches``: hTasks, micro-batches and the per-stage ordered actions
        that `forward_backward` runs (and `explain(batches)` prints). Validates the batches."""
        check_batches(batches, self.mux.tasks, self.batch_spec)
        return self.planner.plan(batches)

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
        return explain_program(self, batches)  # validates batches (through `plan`)

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
            dot = safe_child(directory, "partition.dot")
            write_dot(self.partitioned, dot)
            paths.append(dot)
        report = self.explain(batches)
        p = safe_child(directory, "explain.txt")
        p.write_text(str(report) + "\n")
        paths.append(p)
        if report.plan is not None:
            paths += dump_plan(report.plan, directory)
        if self.last_plan is not None and self.measured is not None:
            paths += dump_measured(self.last_plan, self.measured, directory)
        return paths

    def save_adapters(self, directory: str | Path) -> list[Path]:
        """Write each task's adapter to ``<directory>/<task>/`` in PEFT format.

        Every target is checked to lie inside ``directory`` before anything is written. With
        stages on several processes this is collective (call it on every rank): each adapter
        tensor is first copied from the rank that trains it, then rank 0 writes.
        """
        targets = {name: safe_child(directory, name) for name in self.tasks}
        if self.stage_group is not None:
            names = {n: t for n, t in self.mux.tensors.items() if t.requires_grad}
            self.executor.share_params(names)
            if self.rank != 0:
                return []
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
    return Program(state, options, history)
