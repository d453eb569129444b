"""`plan_step`: the plan of one step for given batches — the object `explain()` prints and the
runtime executes.

hTasks (spatial: all tasks; temporal: one per task; auto: the fusion DP's choice), each
hTask's micro-batches (its chunk steps with ``alignment="chunk"``, at the hTask's own chunk size
unless ``chunk_size`` is set (`AutoFusion.group_chunks`), laid out here once; else
``micro_batches`` row splits), per-stage times from the cost model, and the pipeline schedule
that interleaves hTasks (`muxc.plan.simulate.best_schedule`), simulated for makespan, bubble
fraction and peak activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from muxc.ir import MuxGraph
from muxc.ir.chunks import build_layout
from muxc.ir.step import HTask, StepPlan
from muxc.options import Alignment, Fusion, Options
from muxc.plan.fusion import AutoFusion, loads_of, sample_lengths
from muxc.ir.recompute import RecomputePlan
from muxc.plan.summary import ModelSummary, summarize_graph
from muxc.plan.simulate import best_schedule, time_table

__all__ = ["Planner", "plan_step"]


class Planner:
    """Plans steps of one compiled graph under fixed options (the cost model is built lazily)."""

    def __init__(self, mux: MuxGraph, options: Options, summary: ModelSummary | None = None,
                 recompute: RecomputePlan | None = None):
        self.mux = mux
        self.recompute = recompute  # what steps keep for backward (the summary's memory)
        self.options = options
        self.device = next(iter(mux.tensors.values())).device
        self._summary = summary
        self._fusion: AutoFusion | None = None
        # per-task sample lengths (and batch shapes) -> the plan made for them: a later step
        # with the same lengths reuses its choices and lays out only its own tokens
        self._memo: dict[tuple, StepPlan] = {}

    @property
    def summary(self) -> ModelSummary:
        """The graph's cost summary (built once, shared by `with_options` planners)."""
        if self._summary is None:
            self._summary = summarize_graph(self.mux, recompute=self.recompute)
        return self._summary

    @property
    def fusion(self) -> AutoFusion:
        """Cost-model pricing of hTasks and the fusion DP (built on first use)."""
        if self._fusion is None:
            self._fusion = AutoFusion(self.mux, self.options, summary=self.summary)
        return self._fusion

    def with_options(self, options: Options) -> Planner:
        """A planner of the same graph under ``options`` (reuses the summary)."""
        return Planner(self.mux, options, self.summary, self.recompute)

    def alone(self) -> Planner:
        """A planner that plans one task's batch on its own (temporal: the fusion DP's memory
        check is left to the caller), sharing this one's summary and cost model."""
        solo = Planner(self.mux, replace(self.options, fusion=Fusion.TEMPORAL), self.summary)
        solo._fusion = self.fusion  # pricing does not depend on the fusion mode
        return solo

    def chunk_size(self, present: Mapping[str, Mapping], loads=None) -> int | None:
        """The step's chunk size (None: pad): ``chunk_size`` if set, else the step's reference
        chunk, the smallest power of two (at least 16) that holds its longest sample.

        Without a fixed ``chunk_size`` each hTask runs its own chunk size, priced on its exact
        packing (`AutoFusion.group_chunks`); the reference only sizes the fusion DP's
        saturation limit, is one more candidate for each hTask, and prices the all-tasks
        alternative the DP shows when it may not pick it. It is not priced itself: pricing all
        tasks fused at every power of two, as this did before, was ~40% of planning a step
        (28.6 -> 16.3 ms, llama-cpu, 8 non-uniform tasks, the same batches in one process).
        ``loads``: `loads_of` ``(present)``, when the caller has it already."""
        if self.options.alignment is not Alignment.CHUNK:
            return None
        if self.options.chunk_size:
            return self.options.chunk_size
        loads = loads_of(present) if loads is None else loads
        longest = max((int(v[1]) for v in loads.values()), default=1)
        return 1 << max(4, (longest - 1).bit_length())

    def plan(self, batches: Mapping[str, Mapping]) -> StepPlan:
        return plan_step(self, batches)

    def split(self, plan: StepPlan, batches: Mapping[str, Mapping],
              htask: int | None = None) -> StepPlan | None:
        """The next-best plan after ``plan`` ran out of memory in hTask ``htask`` (its index;
        None: not known, the fused hTask with the most tokens per micro-batch).

        That hTask's tasks are re-planned by the fusion DP with at most half as many tasks per
        hTask (`AutoFusion.split`), the other hTasks and the chunk size are kept. None when that
        hTask runs a single task (nothing to split).
        """
        groups = [h.tasks for h in plan.htask_plans]
        if htask is None:
            fused = [i for i, g in enumerate(groups) if len(g) > 1]
            if not fused:
                return None
            htask = max(fused, key=lambda i: plan.costs[i].tokens)
        if len(groups[htask]) < 2:
            return None
        order = {t: i for i, t in enumerate(self.mux.tasks)}
        parts = [tuple(sorted(p, key=order.get))
                 for p in self.fusion.split(batches, plan.htask_plans[htask].chunk_size, groups[htask])]
        own = tuple(h.chunk_size for h in plan.htask_plans)
        return plan_step(self, batches, (*groups[:htask], *parts, *groups[htask + 1:]), plan.chunk_size,
                         (*own[:htask], *(own[htask],) * len(parts), *own[htask + 1:]))


def _groups(planner: Planner, present: Mapping[str, Mapping], chunk: int | None):
    tasks = [t for t in planner.mux.tasks if t in present]
    fusion = planner.options.fusion
    if fusion is Fusion.SPATIAL:
        return [tuple(tasks)], None
    if fusion is Fusion.TEMPORAL:
        return [(t,) for t in tasks], None
    chosen = planner.fusion.plan(present, chunk)
    order = {t: i for i, t in enumerate(planner.mux.tasks)}
    return [tuple(sorted(h, key=order.get)) for h in chosen.htasks], chosen


def _pad_tokens(present: Mapping[str, Mapping], group: tuple[str, ...], loads) -> tuple[int, int]:
    """(tokens computed, real tokens) of ``group`` padded to its widest batch; ``loads`` are
    `loads_of` (real tokens counted there once)."""
    seq = max(present[t]["input_ids"].shape[1] for t in group)
    return sum(loads[t][2] for t in group) * seq, sum(loads[t][0] for t in group)


def plan_step(planner: Planner, batches: Mapping[str, Mapping],
              groups: tuple[tuple[str, ...], ...] | None = None,
              chunk_size: int | None = None,
              chunks: tuple[int | None, ...] | None = None) -> StepPlan:
    """Plan one step of ``batches`` (tasks absent from ``batches`` are not run).

    ``groups``: the hTasks to run, with ``chunk_size`` as given (`Planner.split`); the plan's
    ``fusion`` is then None. Without it the options (and the fusion DP) choose both.
    ``chunks``: each group's chunk size (default: ``chunk_size`` for all when set in the
    options, else each hTask's best, `AutoFusion.group_chunks`).
    """
    present = {t: b for t, b in batches.items() if t in planner.mux.tasks}
    key = None
    if groups is None and chunks is None:
        key = _lengths_key(planner, present)
        seen = planner._memo.get(key)
        if seen is not None:
            return _lay_out_again(planner, seen, present)
    loads = loads_of(present)
    if groups is None:
        chunk = planner.chunk_size(present, loads)
        groups, chosen = _groups(planner, present, chunk)
    else:
        chunk, chosen = chunk_size, None
    htasks, costs = [], []
    computed = real = 0
    if chunks is None:
        chunks = (chunk,) * len(groups)
        if chunk is not None and planner.options.chunk_size is None:
            chunks = planner.fusion.group_chunks(present, groups, chunk)
    for g, c_g in zip(groups, chunks):
        if c_g is not None:
            layout = build_layout(present, g, c_g, planner.device, heads=planner.mux.heads)
            m = len(layout.steps)
            computed += layout.tokens_computed
            real += layout.real_tokens
        else:
            layout = None
            m = min(planner.options.micro_batches or 1, max(loads[t][2] for t in g))
            c, r = _pad_tokens(present, g, loads)
            computed += c
            real += r
        htasks.append(HTask(tasks=g, micro_batches=m, layout=layout))
        costs.append(planner.fusion.price(loads, g, c_g, micro_batches=m, layout=layout))
    stages = planner.options.stages
    if chosen is not None and stages == 1 and len(htasks) > 1:
        # run the hTask with the most activations first: at the end of its forward (a step's
        # memory peak) no other hTask's adapter gradients exist yet (they live until the
        # optimizer step); the DP's groups come smallest first
        def held(i: int) -> float:  # a chunked hTask holds all its chunk steps at once
            h = htasks[i]
            return costs[i].activation_bytes * (h.micro_batches if h.layout is not None else 1)

        first = sorted(range(len(htasks)), key=lambda i: -held(i))
        htasks, costs = [htasks[i] for i in first], [costs[i] for i in first]
    fwd = time_table([[c.forward for c in costs]] * stages)
    bwd = time_table([[c.backward for c in costs]] * stages)
    act = time_table([[c.activation_bytes for c in costs]] * stages)
    fixed = planner.options.schedule
    schedule, sim = best_schedule(
        [h.micro_batches for h in htasks], stages, chunk is not None, fwd, bwd, act_bytes=act,
        policies=("interleaved", "1f1b") if fixed is None else (fixed,),
    )
    plan = StepPlan(
        htask_plans=tuple(htasks),
        costs=tuple(costs),
        chunk_size=chunk,
        stages=stages,
        schedule=schedule,
        sim=sim,
        fusion=chosen,
        tokens_computed=computed,
        real_tokens=real,
    )
    if key is not None:
        if len(planner._memo) >= _MEMO_SIZE:
            planner._memo.clear()
        planner._memo[key] = plan
    return plan


_MEMO_SIZE = 256  # plans remembered per planner (cleared when full)


def _lengths_key(planner: Planner, present: Mapping[str, Mapping]) -> tuple:
    """What a step's plan depends on: each present task's rows, padded width and the real
    tokens of each sample (not the tokens themselves)."""
    lengths = sample_lengths(present)
    return tuple((t, tuple(present[t]["input_ids"].shape), lengths[t])
                 for t in planner.mux.tasks if t in present)


def _lay_out_again(planner: Planner, plan: StepPlan, present: Mapping[str, Mapping]) -> StepPlan:
    """``plan`` (made for batches of the same lengths) with ``present``'s own tokens laid out
    (same chunk sizes, so the same chunk steps, costs and schedule)."""
    htasks = tuple(
        h if h.layout is None else replace(h, layout=build_layout(
            present, h.tasks, h.layout.chunk_size, planner.device, heads=planner.mux.heads))
        for h in plan.htask_plans)
    return replace(plan, htask_plans=htasks)
