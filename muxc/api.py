"""`compile(tasks)` runs the PIPELINE; `Program` trains the compiled tasks together."""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from types import MappingProxyType

import torch

from muxc.admission import admit_plan, check_tokens
from muxc.dump.dot import write_dot
from muxc.dump import dump_history, dump_measured, dump_plan
from muxc.errors import (
    EmptyBatchWarning,
    NonFiniteWarning,
    OptionsError,
    OutOfMemoryRetryWarning,
    StepOutOfMemoryError,
    TaskPausedWarning,
    TaskSpecError,
)
from muxc.explain import Explanation, explain_program
from muxc.frontends.peft import vocab_sizes
from muxc.ir import MuxGraph
from muxc.kinds import spec_of
from muxc.ir.recompute import RecomputePlan, recompute_module
from muxc.plan.recompute_choice import choose_kept
from muxc.names import safe_child
from muxc.options import Alignment, Options
from muxc.pipeline import CompileContext, CompileState, PassRecord, run_pipeline
from muxc.ir import PartitionedGraph, SimResult, StepPlan
from muxc.plan import Planner
from muxc.runtime.batch import BatchSpec, check_batches, unlabeled, with_virtual_tokens
from muxc.runtime.distributed import StageExecutor, join_stage_group
from muxc.passes.prefix_attention import prefix_records, refuse_prefix
from muxc.passes import select_kernels
from muxc.runtime.local import LocalExecutor
from muxc.runtime.oom import GradRollback, is_out_of_memory
from muxc.runtime.training import StepOutcome, TaskState, build_states, nonfinite
from muxc.checkpoint import load_checkpoint, save_checkpoint
from muxc.save import save_task_adapter
from muxc.task import Task

__all__ = ["compile", "Program", "RUN_TIME_OPTIONS"]

# Options read only when a step runs: `Program.with_options` may change these without
# recompiling. The others (alignment, stages, verify, pipeline_timeout) act while compiling.
RUN_TIME_OPTIONS = (
    "fusion", "chunk_size", "micro_batches", "kernel_impl", "memory_budget", "cost_model", "schedule",
    "max_bad_steps", "max_task_tokens",
)


class Program:
    """A compiled multi-task program (examples not run as doctests: they need PEFT models).

    >>> program = muxc.compile(tasks)                       # doctest: +SKIP
    >>> program.forward_backward({"a": batch_a, "b": batch_b})  # doctest: +SKIP
    {'a': tensor(4.85), 'b': tensor(4.87)}
    """

    def __init__(self, state: CompileState, options: Options, history: list[PassRecord]):
        """From the pipeline's final ``state``; ``history`` is its pass records."""
        self.options = options
        self.states: dict[str, TaskState] = {}
        self.batch_spec = BatchSpec(  # one base model for all tasks: any task's sizes do
            *vocab_sizes(state.tasks[0].name, state.tasks[0].model),
            right_padded=options.alignment is Alignment.CHUNK,
            heads=dict(state.mux_graph.heads),
        )
        self.stage_group = None
        if options.stages > 1:
            device = next(iter(state.mux_graph.tensors.values())).device
            self.stage_group = join_stage_group(options.stages, options.pipeline_timeout, device)
            if self.stage_group is not None:
                _no_clipping_across_stages(state.tasks)
                refuse_prefix(prefix_records(state.mux_graph), "stages on several processes",
                              "every stage reads the task's prefix encoder, and its gradient "
                              "would have to be summed across the processes")
        self._install(state, history)

    def _install(self, state: CompileState, history: list[PassRecord]) -> None:
        """Take the compiled graph and plan of ``state``; tasks already in ``states`` keep their
        training state (optimizer, scheduler, counters), new ones get a fresh one."""
        mux: MuxGraph = state.mux_graph
        self.batch_spec = dataclasses.replace(self.batch_spec, heads=dict(mux.heads),
                                              virtual=_virtual_tokens(mux))
        records = {t: list(mux.adapters.get(t, ())) for t in mux.tasks}
        new = [t for t in state.tasks if t.name not in self.states]
        states = build_states(new, {t.name: records[t.name] for t in new})  # may raise: first
        states.update({n: s for n, s in self.states.items() if n in records})
        self.states = {t: states[t] for t in mux.tasks}
        self.tasks = {t.name: t for t in state.tasks}
        self.mux = mux
        self.history = history
        self.kernel_plan = state.kernel_plan
        self.sharing = dict(state.sharing)
        self.adapters = records
        self.partitioned = state.partitioned
        self.exports = state.exports  # one trace template per task structure (no tensors)
        # recompute="auto": which outputs to keep, chosen on this graph by the cost model
        self.recompute: RecomputePlan = choose_kept(mux, state.recompute or RecomputePlan())
        self._runnable = _runnable(mux, state.partitioned, self.recompute)
        self.planner = Planner(mux, self.options, recompute=self.recompute)
        # task -> what the latest forward_backward/step did with it (tasks in its batches)
        self.last_step: Mapping[str, StepOutcome] = MappingProxyType({})
        self.last_plan: StepPlan | None = None  # the plan the last step ran
        self.measured: SimResult | None = None  # the last step's measured timeline
        run_mux, run_pg = self._runnable
        if self.stage_group is None:
            self.executor = LocalExecutor(run_mux, run_pg, self.options.kernel_impl)
        else:
            self.planner.summary  # of the whole graph, before other stages' weights go
            self.executor = StageExecutor(run_mux, run_pg, self.options.kernel_impl, self.stage_group)
            self.executor.release_unowned([t.model for t in state.tasks])

    @property
    def rank(self) -> int:
        """This process's pipeline stage (0 when every stage runs in this process)."""
        return 0 if self.stage_group is None else self.stage_group.rank

    def __repr__(self) -> str:
        return f"Program(tasks={list(self.tasks)}, fusion={self.options.fusion.value}, {self.mux!r})"

    def with_options(self, **changes) -> Program:
        """A Program on this one's compiled graph that runs with changed run-time options.

        The new Program shares the compiled graph, the tasks, their adapters and their training
        states (optimizers, schedulers) with this one; only how steps run changes. Run-time
        options: ``fusion``, ``chunk_size``, ``micro_batches``, ``kernel_impl``,
        ``memory_budget``, ``cost_model``, ``schedule``, ``max_bad_steps``,
        ``max_task_tokens``. Changing ``alignment``,
        ``stages``, ``verify`` or ``pipeline_timeout``
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
        program.kernel_plan = select_kernels(self.mux, CompileContext(options=options)).value
        program.planner = self.planner.with_options(options)
        run_mux, run_pg = self._runnable
        if self.stage_group is None:
            program.executor = LocalExecutor(run_mux, run_pg, options.kernel_impl)
        else:
            program.executor = StageExecutor(run_mux, run_pg, options.kernel_impl, self.stage_group)
        return program

    def forward_backward(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch; adds each task's gradients to its adapter ``.grad``.

        ``batches``: task name -> HF batch (``input_ids``, ``labels``, optional
        ``attention_mask``); tasks may be left out of a step. Losses equal
        ``model(**batch).loss`` of each task alone.

        Every batch is validated first (`BatchError`, nothing computed), then admitted:
        ``Options.max_task_tokens`` and ``memory_budget`` (`AdmissionError`, nothing computed).
        A task whose batch has no label token, or that is paused, is left out with a warning
        (its grads untouched); ``last_step`` says what happened to each task. Returns ``{}`` if
        no task is left.

        Out of memory in an hTask that fuses several tasks: the step is run again once with that
        hTask split (`Planner.split`), gradients and RNG put back first so nothing counts twice
        (`OutOfMemoryRetryWarning`, ``last_step[task].retried``). If that fails too, or nothing
        could be split, `StepOutOfMemoryError` with the gradients as before the step. Not with
        stages on several processes (the error propagates as it is there).
        """
        run, skipped, plan = self._admit(batches)
        losses = {}
        retried = ""
        if run:
            self.last_plan = plan
            losses, retried = self._run_step(plan, run)
            if self.stage_group is None:
                self.measured = self.executor.timeline.result()
            else:
                self.measured = self.executor.gather_timeline().result()
        values = torch.stack(list(losses.values())).tolist() if losses else []
        outcomes = {t: StepOutcome(v, retried=retried) for t, v in zip(losses, values)}
        outcomes.update({t: StepOutcome(None, skipped=True, why=w) for t, w in skipped.items()})
        self.last_step = MappingProxyType({t: outcomes[t] for t in self.mux.tasks if t in outcomes})
        return losses

    def _run_step(self, plan: StepPlan, run: Mapping[str, Mapping]) -> tuple[dict, str]:
        """Run ``plan`` for training: ``(losses, "")``, or after running out of memory in a fused
        hTask, ``(losses of the retry with it split, what happened)`` (see `forward_backward`)."""
        if self.stage_group is not None:  # another rank may be mid-step: no local retry
            return self.executor.run(plan, run, training=True), ""
        fused = any(len(h.tasks) > 1 for h in plan.htask_plans)
        params = [p for t in run for p in self.states[t].params]
        before = GradRollback(params, copy_values=fused)
        try:
            return self.executor.run(plan, run, training=True), ""
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            cause = f"{type(e).__name__}: {str(e)[:200]}"
            failed = self.executor.running
        # out of the except block: the failed attempt's activations (held by its traceback) go
        _free_memory()
        exact = before.restore()
        where = failed.htask if failed is not None else None
        split = self.planner.split(plan, run, where)
        if split is None:
            raise _out_of_memory(plan, where, cause, exact, retried=None)
        try:
            losses = self.executor.run(split, run, training=True)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            cause = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            self.last_plan = split
            failed_tasks = plan.htasks[where] if where is not None else "(before any action)"
            what = f"out of memory in hTask {failed_tasks} ({cause}); ran again as hTasks {split.htasks}"
            warnings.warn(OutOfMemoryRetryWarning(f"step ran {what}"), stacklevel=3)
            return losses, what
        _free_memory()
        before.restore()
        raise _out_of_memory(plan, where, cause, True, retried=split)

    def step(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """`forward_backward`, then each stepped task's own optimizer/scheduler step and zero_grad.

        A task with ``Task.grad_accumulation`` k > 1 steps its optimizer only on every k-th call
        it is in (on the mean of the k gradients, clipped to ``Task.max_grad_norm`` when set);
        on the others ``last_step`` reports it skipped, "accumulating (i of k micro-batches)".

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
                if not state.step():  # accumulating: the optimizer steps on a later micro-step
                    outcomes[name] = StepOutcome(outcomes[name].loss, skipped=True, why=(
                        f"accumulating ({state.micro_steps} of {state.accumulation} micro-batches)"))
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

    def add_task(self, task: Task) -> None:
        """Add ``task`` to the program; the other tasks' adapters, optimizers, schedulers and
        step counts are untouched.

        Only ``task`` is traced, and only if no task of the program has its structure (the
        program keeps one trace template per structure, bound to no tensor; the other tasks'
        graphs are re-bound from them); its frozen weights must equal the program's shared base
        (`BaseWeightMismatchError` otherwise), then the graph is merged and planned again over
        all tasks. On any error the program is left as it was. Not with stages on several
        processes.
        """
        self._single_process("add_task")
        self._recompile([*self.tasks.values(), task])

    def remove_task(self, name: str) -> None:
        """Drop task ``name`` from the program (its adapter stays in the user's model, trained
        as far as it got); the other tasks' state is untouched and nothing is traced (their
        graphs are re-bound from the kept trace templates)."""
        self._single_process("remove_task")
        if name not in self.tasks:
            raise TaskSpecError(f"unknown task {name!r}; the program's tasks are {list(self.tasks)}")
        if len(self.tasks) == 1:
            raise TaskSpecError(f"cannot remove {name!r}, the program's only task; a program "
                                "needs at least one task")
        self._recompile([t for n, t in self.tasks.items() if n != name])

    def _recompile(self, tasks: list[Task]) -> None:
        """Run the pipeline over ``tasks``, then install it. Task graphs do not outlive a compile
        (memory); the kept trace templates do, so only a structure new to the program is traced."""
        state, history = run_pipeline(tasks, CompileContext(options=self.options, exports=self.exports))
        self._install(state, history)

    def _single_process(self, what: str) -> None:
        if self.stage_group is not None:
            raise TaskSpecError(
                f"{what} is not supported yet with stages on several processes "
                f"(Options(stages={self.options.stages})): compile the new task list again"
            )

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write everything needed to continue training bit-identically to directory ``path``.

        Per task: its adapter in PEFT format, optimizer and LR-scheduler state, step count and
        bad-step/paused state; plus torch's RNG states (dropout), the options and a manifest
        (tasks, adapter tensor names/shapes/dtypes, muxc version, each file's SHA-256). Data
        only (safetensors + JSON, never pickle). Atomic: written to a sibling temp directory,
        fsynced, then swapped in, so a crash mid-save leaves the previous checkpoint at
        ``path``. Gradients are not saved (save after `step`). Not with stages on several
        processes yet (`CheckpointError`).
        """
        return save_checkpoint(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a `save_checkpoint` into this program (compiled from the same task
        definitions), so that training continues as if it had never stopped.

        Everything is checked against the program first — file hashes and formats, options,
        task names, adapter tensor names/shapes/dtypes, PEFT configs, optimizer and scheduler
        kinds — and a mismatch raises `CheckpointError` naming the file, task or field with
        nothing changed. Restores torch's global RNG state too. Adapter gradients are cleared.
        """
        load_checkpoint(self, path)

    def resume_task(self, name: str) -> None:
        """Let a task paused after repeated non-finite steps train again."""
        if name not in self.states:
            raise TaskSpecError(f"unknown task {name!r}; compiled tasks are {list(self.states)}")
        self.states[name].resume()

    @torch.no_grad()
    def evaluate(self, batches: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
        """Losses without gradients (dropout off); tasks without label tokens are left out.
        Batches are validated and ``max_task_tokens`` is checked (no activations are kept, so
        ``memory_budget`` is not)."""
        run, _, _ = self._admit(batches, training=False)
        if not run:
            return {}
        return self.executor.run(self.planner.plan(run), run, training=False, backward=False)

    def plan(self, batches: Mapping[str, Mapping]) -> StepPlan:
        """The `StepPlan` for ``batches``: hTasks, micro-batches and the per-stage ordered actions
        that `forward_backward` runs (and `explain(batches)` prints). Validates the batches."""
        check_batches(batches, self.mux.tasks, self.batch_spec)
        return self.planner.plan(with_virtual_tokens(batches, self.batch_spec.virtual))

    def _admit(self, batches: Mapping[str, Mapping], training: bool = True):
        """Validate every batch and check ``max_task_tokens``; leave out paused tasks (only when
        ``training``) and those without label tokens; when ``training``, plan the rest and
        check the plan against ``memory_budget``. Only then warn once per left-out task.
        Returns ``(batches to run, {left-out task: why}, plan or None)``."""
        check_batches(batches, self.mux.tasks, self.batch_spec)
        # prompt-learning tasks' virtual tokens are real tokens from here on (muxc.kinds.prompt)
        batches = with_virtual_tokens(batches, self.batch_spec.virtual)
        check_tokens(batches, self.options.max_task_tokens)
        skipped: dict[str, str] = {}
        notes: list[Warning] = []
        for name in batches:
            if training and self.states[name].paused:
                skipped[name] = "paused"
                notes.append(TaskPausedWarning(
                    f"task {name!r} is paused after {self.states[name].bad_steps} non-finite "
                    f"steps and was left out; call program.resume_task({name!r}) to train it"
                ))
        for name in unlabeled({t: b for t, b in batches.items() if t not in skipped}, self.mux.heads):
            skipped[name] = "no label tokens"
            notes.append(EmptyBatchWarning(
                f"task {name!r}: batch has no label tokens (labels are all -100 after the "
                "causal shift; a label at position 0 predicts nothing), so it was left out "
                "of this step instead of giving a NaN loss"
            ))
        run = {t: b for t, b in batches.items() if t not in skipped}
        plan = admit_plan(self.planner, run, self.options.memory_budget) if training and run else None
        for note in notes:
            warnings.warn(note, stacklevel=3)
        return run, skipped, plan

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


def _free_memory() -> None:
    """Let the allocator reuse what a failed attempt held (its tensors are unreachable now)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _out_of_memory(plan: StepPlan, htask: int | None, cause: str, exact: bool,
                   retried: StepPlan | None) -> StepOutOfMemoryError:
    """The error for a step that ran out of memory (and, with ``retried``, whose retry did)."""
    where = f"hTask {plan.htasks[htask]}" if htask is not None else "the step"
    if retried is not None:
        what = f"ran out of memory in {where} and again when run as hTasks {retried.htasks}"
    else:
        what = f"ran out of memory in {where}, which runs one task (nothing to split, not retried)"
    grads = ("adapter gradients are as they were before the step" if exact else
             "adapter gradients that held values before the step may hold part of it: zero them")
    return StepOutOfMemoryError(
        f"step {what} ({cause}); {grads}. Remedy: smaller batches (fewer rows or shorter "
        "samples per task), Options(memory_budget=...) so the fusion planner keeps fused "
        "activations under it, fusion='temporal' (one task per hTask), or micro_batches / "
        "alignment='chunk' with a smaller chunk_size"
    )


def _runnable(mux: MuxGraph, pg: PartitionedGraph | None, plan: RecomputePlan):
    """The graph and stages the executors run: ``mux`` and ``pg`` with their checkpointed
    decoder layers recomputed in backward (`muxc.ir.recompute`); themselves without."""
    gm = recompute_module(mux.gm, plan)
    run_mux = mux if gm is mux.gm else dataclasses.replace(mux, gm=gm)
    if pg is None:
        return run_mux, None
    stages = tuple(dataclasses.replace(st, module=recompute_module(st.module, plan)) for st in pg.stages)
    run_pg = pg if all(a.module is b.module for a, b in zip(stages, pg.stages)) \
        else dataclasses.replace(pg, mux=run_mux, stages=stages)
    return run_mux, run_pg


def _virtual_tokens(mux: MuxGraph) -> dict[str, int]:
    """Task -> tokens its adapter kinds put in front of each row (`AdapterKindSpec.prepends`)."""
    out = {t: sum(spec_of(r.kind).prepends(r) for r in recs) for t, recs in mux.adapters.items()}
    return {t: n for t, n in out.items() if n}


def _no_clipping_across_stages(tasks: list[Task]) -> None:
    clipped = [t.name for t in tasks if t.max_grad_norm is not None]
    if clipped:
        raise TaskSpecError(
            f"task(s) {clipped} set max_grad_norm, which needs each task's gradient norm over all "
            "stages; it is not supported yet with stages on several processes: clip in one "
            "process (stages=1) or leave max_grad_norm=None"
        )


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
    return Program(state, options, history)
