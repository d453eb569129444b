"""`AutoFusion`: choose hTasks for a step's batches with the fusion DP and the cost model.

Each candidate hTask is priced by `muxc.plan.estimate_step` on the layout the executor would
run (pad: rows of the group's longest sample split over ``micro_batches``; chunk: one call
per chunk step, runs of steps with the same active tasks priced together at their mean
kept-K/V length), split over ``stages``; every micro-batch pays each op's per-call cost. Plans are cached per
distinct per-task load signature, so steady-state steps pay nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch

from muxc.ir import MuxGraph
from muxc.ir.chunks import ChunkLayout, stream_chunks
from muxc.options import Alignment, Options
from muxc.ir.step import FusionPlan, GroupCost, HTaskCost
from muxc.plan.fusion_dp import plan_fusion
from muxc.plan.cost import CostModel, StepShape, saturation_tokens
from muxc.plan.isolated import profile_in_child
from muxc.plan.memory import estimate_memory
from muxc.plan.pricing import StepPricer
from muxc.plan.profile import Clock, load_or_profile
from muxc.plan.summary import ModelSummary, summarize_graph

MEMORY_SLACK = 0.02
"""`AutoFusion` plans with this ``memory_slack`` (`plan_fusion`): of the groupings predicted
within 2% of the fastest, the one whose largest hTask holds the fewest activations. The cost
model's error on a step is larger than that (README, Planner), so the fastest prediction is
not known to be faster, while the smaller peak is (an hTask's activations are alive until its
backward): measured on the weights-dominant benchmark model (README, Benchmarks)."""

__all__ = ["AutoFusion", "HTaskCost", "TaskLoad", "loads_of", "sample_lengths", "chunk_runs",
           "CHUNK_STEP_SLACK", "MEMORY_SLACK"]


def loads_of(batches: Mapping[str, Mapping]) -> dict[str, tuple[int, int, int]]:
    """task -> (real tokens, longest sample, rows) of its batch."""
    out = {}
    for t, b in batches.items():
        ids = b["input_ids"]
        m = b.get("attention_mask")
        lens = m.sum(1) if m is not None else ids.new_full((ids.shape[0],), ids.shape[1])
        out[t] = (int(lens.sum()), int(lens.max()), int(ids.shape[0]))
    return out


CHUNK_STEP_SLACK = 0.10
"""`AutoFusion.group_chunks` picks, of the chunk sizes predicted within 10% of an hTask's
fastest, the one with the fewest chunk steps (then the fastest). The cost model prices what a
chunk step adds (every op called again, the kept K/V re-read) below what it costs: measured
on llama-cpu (one RTE task, 4 samples of 83-171 tokens, forward+backward, thread CPU, median of
11): chunk 64 (4 steps) predicted 201.5 ms, ran 211.6; chunk 128 (2 steps) 212.7 vs 186.7;
chunk 256 (1 step) 216.3 vs 190.2, so the fastest prediction was the slowest run."""

TaskLoad = tuple[int, int, int]


class AutoFusion:
    """Plans hTasks for ``fusion="auto"``."""

    def __init__(self, mux: MuxGraph, options: Options, cost: CostModel | None = None,
                 summary: ModelSummary | None = None):
        self.summary = summary if summary is not None else summarize_graph(mux)
        if cost is None:
            device = next(iter(mux.tensors.values())).device
            if options.cost_model:  # a short on-device profile, cached per device in this JSON
                # one CPU thread: time it in thread CPU time, immune to other processes
                one = device.type == "cpu" and torch.get_num_threads() == 1
                clock = Clock.THREAD if one else Clock.WALL
                cost = CostModel(load_or_profile(options.cost_model, device,
                                                 self.summary.op_keys(), clock=clock,
                                                 profiler=profile_in_child))
            else:
                cost = CostModel.for_device(device)  # analytic roofline of this device
        self.cost = cost
        self.options = options
        self.pricer = StepPricer(self.summary, cost)  # estimate_step's totals, memoised by part
        self._saturation: dict[int, int] = {}
        self._plan = lru_cache(maxsize=64)(self._plan_uncached)
        self._group_chunk = lru_cache(maxsize=512)(self._group_chunk_uncached)

    def plan(self, batches: Mapping[str, Mapping], chunk_size: int | None) -> FusionPlan:
        """The fusion DP's hTasks for ``batches`` at step chunk size ``chunk_size`` (None: pad).

        Where each hTask will run its own chunk size (``alignment="chunk"`` without a fixed
        ``chunk_size``: `group_chunks`), each candidate is priced at its own best chunk size on
        its exact packed layout, as the plan will run it; at ``chunk_size`` itself, a group of
        one task with long samples would pay chunk steps it never runs (on llama-large's 8
        short tasks the DP priced the 8 tasks apart at 4.0 s where their plan is 2.8 s)."""
        loads = loads_of(batches)
        lengths = None
        if chunk_size is not None and self.options.chunk_size is None:
            lengths = tuple(sorted(sample_lengths(batches).items()))
        return self._plan(tuple(sorted(loads.items())), chunk_size, None, lengths)

    def _shapes(
        self, loads: Mapping[str, TaskLoad], group: tuple[str, ...], chunk: int | None,
        micro_batches: int | None, layout: ChunkLayout | None,
    ) -> list[tuple[StepShape, int]]:
        """The hTask's micro-batches as ``(shape of all of them together, how many)`` runs
        of like micro-batches (same active tasks); see `price`."""
        if layout is not None:
            return _layout_runs(layout)
        if self.options.alignment is not Alignment.CHUNK:
            rows = {t: loads[t][2] for t in group}
            m = micro_batches or self.options.micro_batches or 1
            return [(StepShape(rows, max(loads[t][1] for t in group)), max(1, m))]
        # each task packs its samples into streams of its own capacity (its longest sample,
        # in chunks) and is active in the first `active[t]` chunk steps
        rows = {t: max(1, math.ceil(loads[t][0] / chunk)) for t in group}
        active = {t: min(rows[t], math.ceil(max(loads[t][1], chunk) / chunk)) for t in group}
        runs, start = [], 0
        for end in sorted(set(active.values())):
            members = [t for t in group if active[t] >= end]
            n = end - start
            kv = round(chunk * (start + end + 1) / 2)  # mean attended length of these steps
            shape = StepShape({t: rows[t] * n / active[t] for t in members}, chunk, kv)
            runs.append((shape, n))
            start = end
        return runs

    def group_chunks(self, batches: Mapping[str, Mapping], groups, default: int) -> tuple[int, ...]:
        """Each hTask's own chunk size: of the candidates predicted within `CHUNK_STEP_SLACK`
        of the fastest for that hTask's samples, packed exactly as the executor will pack them
        (`stream_chunks`), the one with the fewest chunk steps (then the fastest).

        Candidates: ``default`` (the step's chunk size), powers of two from 16 up to the
        first at or past the hTask's longest sample, and that longest sample itself (one chunk
        step: every stream is one row, samples packed with a document mask, no padding beyond
        the longest stream and no per-chunk-step cost). More chunk steps cost every op call
        and re-read every frozen weight once more per step; larger chunks leave more padding.
        """
        lengths = sample_lengths(batches)
        return tuple(self._group_chunk(tuple(sorted((t, lengths[t]) for t in g)), default)
                     for g in groups)

    def _group_chunk_uncached(self, items: tuple, default: int) -> int:
        lengths = dict(items)
        longest = max((max(v) for v in lengths.values() if v), default=1)
        candidates = {default, longest}
        c = 16
        while c < longest:
            candidates.add(c)
            c *= 2
        candidates.add(c)

        # a candidate with no more chunk steps, tokens and kept K/V than another is no slower:
        # price only the others (pure-int packing is cheap, pricing is not)
        shape = {}
        for c in sorted(candidates):
            streams = [stream_chunks(v, c) for v in lengths.values()]
            steps = max((s[0] for s in streams if s), default=0)
            shape[c] = (steps, c * sum(sum(s) for s in streams))
        kept = [c for c in shape
                if not any(d < c and shape[d][0] <= shape[c][0] and shape[d][1] <= shape[c][1]
                           for d in shape)]

        totals = {c: sum(sum(self.pricer(run, n)) for run, n in chunk_runs(lengths, c))
                  for c in kept}
        fastest = min(totals.values())
        near = [c for c in kept if totals[c] <= fastest * (1 + CHUNK_STEP_SLACK)]
        return min(near, key=lambda c: (shape[c][0], totals[c], c))

    def price(
        self, loads: Mapping[str, TaskLoad], group: tuple[str, ...], chunk: int | None,
        micro_batches: int | None = None, layout: ChunkLayout | None = None,
    ) -> HTaskCost:
        """Predicted per-stage, per-micro-batch times and activations of hTask ``group``.

        Every micro-batch is one forward and one backward call of the graph, so each op's
        fixed cost is paid once per micro-batch (`estimate_step`'s ``micro_batches``). With
        ``layout`` (the chunk layout the executor will run) its steps are priced as they
        are; else they are estimated from ``loads``: chunk steps of the tasks still active,
        attending to the mean kept K/V length; pad mode ``micro_batches`` equal row splits.
        """
        return self._price_runs(self._shapes(loads, group, chunk, micro_batches, layout))

    def _price_runs(self, runs: list[tuple[StepShape, int]]) -> HTaskCost:
        """`price` of an hTask run as ``runs``: (shape of n like micro-batches together, n)."""
        fwd = bwd = act = 0.0
        m = tokens = 0
        for shape, n in runs:
            f, b = self.pricer(shape, n)
            fwd, bwd, m = fwd + f, bwd + b, m + n
            per_mb = StepShape({t: r / n for t, r in shape.rows.items()}, shape.seq_len,
                               shape.kv_len)
            act = max(act, self.pricer.activation_bytes(per_mb))
            tokens = max(tokens, round(per_mb.padded_tokens))
        stages = self.options.stages
        return HTaskCost(
            micro_batches=m,
            forward=fwd / stages / m,
            backward=bwd / stages / m,
            activation_bytes=act / stages,
            tokens=tokens,
        )

    def _held(self, h: HTaskCost, runs: list[tuple[StepShape, int]]) -> float:
        """Activation bytes hTask ``h`` (priced from ``runs``) holds at once on one stage: with
        chunk alignment every chunk step's, until its backward (the chunk steps of an hTask
        run forward all, then backward all: later steps attend to the earlier ones' K/V);
        else one micro-batch's."""
        if self.options.alignment is not Alignment.CHUNK:
            return h.activation_bytes
        held = 0.0
        for shape, n in runs:
            per_mb = StepShape({t: r / n for t, r in shape.rows.items()}, shape.seq_len,
                               shape.kv_len)
            held += n * self.pricer.activation_bytes(per_mb)
        return held / self.options.stages

    def saturation(self, seq_len: int) -> int:
        """`saturation_tokens` at ``seq_len`` (it depends only on the program: memoised)."""
        sat = self._saturation.get(seq_len)
        if sat is None:
            sat = self._saturation[seq_len] = saturation_tokens(self.summary, cost=self.cost,
                                                                seq_len=seq_len)
        return sat

    def split(self, batches: Mapping[str, Mapping], chunk: int | None,
              tasks: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """hTasks for ``tasks`` (a fused hTask that ran out of memory) with at most half as many
        tasks each (rounded up): the fusion DP's best such grouping of them alone."""
        loads = loads_of({t: batches[t] for t in tasks})
        items = tuple(sorted(loads.items()))
        return self._plan_uncached(items, chunk, max_tasks=math.ceil(len(tasks) / 2)).htasks

    def _plan_uncached(self, items: tuple, chunk: int | None, max_tasks: int | None = None,
                       lengths: tuple | None = None) -> FusionPlan:
        """The DP over ``items`` (task, load); ``lengths`` (task, sample lengths): price each
        group at its own chunk size (`plan`), else every group at ``chunk``."""
        loads = dict(items)
        stages = self.options.stages
        own = dict(lengths) if lengths is not None else None

        priced: dict[tuple[str, ...], GroupCost] = {}  # the DP's candidates, asked again at its end

        def cost(group: tuple[str, ...]) -> GroupCost:
            c = priced.get(group)
            if c is None:
                if own is None:
                    runs = self._shapes(loads, group, chunk, None, None)
                else:
                    mine = tuple(sorted((t, own[t]) for t in group))
                    runs = chunk_runs(dict(mine), self._group_chunk(mine, chunk))
                h = self._price_runs(runs)
                c = priced[group] = _group_cost(h, self._held(h, runs))
            return c

        seq = chunk or max(v[1] for v in loads.values())
        sat = self.saturation(max(seq, 1))
        budget = None
        if self.options.memory_budget is not None:
            fixed = estimate_memory(self.summary, {}, seq_len=max(seq, 1)).total
            budget = (self.options.memory_budget - fixed) / stages

        def shown(group: tuple[str, ...]) -> GroupCost:  # not a candidate: at the step's chunk
            h = self.price(loads, group, chunk)
            return _group_cost(h, h.activation_bytes)

        return plan_fusion({t: v[0] for t, v in loads.items()}, cost, stages, sat, budget, max_tasks,
                           memory_slack=MEMORY_SLACK, shown_cost=shown if own is not None else None)


def _group_cost(h: HTaskCost, activation_bytes: float) -> GroupCost:
    """The fusion DP's view of hTask cost ``h`` holding ``activation_bytes``."""
    slot = h.forward + h.backward
    return GroupCost(work=slot * h.micro_batches, slot=slot, activation_bytes=activation_bytes,
                     tokens=h.tokens)


def sample_lengths(batches: Mapping[str, Mapping]) -> dict[str, tuple[int, ...]]:
    """task -> real tokens of each of its samples (rows)."""
    out = {}
    for t, b in batches.items():
        ids = b["input_ids"]
        m = b.get("attention_mask")
        lens = m.sum(1).tolist() if m is not None else [ids.shape[1]] * ids.shape[0]
        out[t] = tuple(int(n) for n in lens)
    return out


def chunk_runs(lengths: Mapping[str, tuple[int, ...]], chunk: int) -> list[tuple[StepShape, int]]:
    """The chunk steps `build_layout` makes of samples of ``lengths`` (task -> real tokens
    per sample) at ``chunk``, as `_layout_runs` prices them, without building tensors.

    >>> [(dict(s.rows), s.seq_len, s.kv_len, n) for s, n in chunk_runs({"a": (60, 20), "b": (100,)}, 64)]
    [({'a': 2, 'b': 1}, 64, 64, 1), ({'b': 1}, 64, 128, 1)]
    """
    streams = {t: stream_chunks(v, chunk) for t, v in lengths.items()}
    steps = max((s[0] for s in streams.values() if s), default=0)
    runs: list[tuple[StepShape, int]] = []
    key, first, n = None, 0, 0
    for c in (*range(steps), None):
        k = None if c is None else tuple((t, r) for t, s in streams.items()
                                         if (r := sum(1 for x in s if x > c)))
        if k != key and n:
            kv = round(chunk * (2 * first + n + 1) / 2)
            runs.append((StepShape({t: r * n for t, r in key}, chunk, kv), n))
            n = 0
        if c is not None:
            if n == 0:
                key, first = k, c
            n += 1
    return runs


def _layout_runs(layout: ChunkLayout) -> list[tuple[StepShape, int]]:
    """A built layout's chunk steps, consecutive steps with equal rows priced together."""
    runs: list[tuple[StepShape, int]] = []
    c = layout.chunk_size
    key, first, n = None, 0, 0
    for step in (*layout.steps, None):
        k = None if step is None else tuple(zip(step.tasks, step.rows))
        if k != key and n:
            kv = round(c * (2 * first + n + 1) / 2)  # mean of (index + 1) * c over the run
            runs.append((StepShape({t: r * n for t, r in key}, c, kv), n))
            n = 0
        if step is not None:
            if n == 0:
                key, first = k, step.index
            n += 1
    return runs
