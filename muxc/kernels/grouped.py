"""Multi-task adapters as a few large torch ops: the default on CPU (`Impl.GROUPED`).

On CPU a LoRA GEMM at adapter ranks costs a fixed ~8 us plus the time to stream its
activations; the per-task reference loop pays the fixed part 7 times per task per layer
(forward and backward) and streams extra copies. This path instead serves *runs* of adjacent
tasks with one set of GEMMs each.

LoRA. A run stacks its tasks' adapters, ``A = [A_i; ...]`` ``(R, K)`` and ``B = [B_i, ...]``
``(N, R)`` with ``R = sum r_i``, and computes for all its tokens at once::

    U = x @ A^T                 (tokens, R)  one GEMM
    U *= M                      M[t, cols of task i] = s_i for t in task i's rows, else 0
    y = U @ B^T (+ base)        one GEMM, the base op's output added in the same GEMM

    dU = (dy @ B) * M    dx = dU @ A    dA = dU^T @ x    dB = dy^T @ (U * M)

then splits ``dA``/``dB`` back per task. The mask makes it exact (each token only meets its
own task's ranks) but every token is multiplied against all ``R`` rank columns of its run.
Which tasks share a run is therefore a cost choice, made once per layout by a small dynamic
program over the tasks in order (`lora_plan`): one run for many short segments of low rank
(the chunk-aligned steps where per-call overhead dominates), one run per task when segments
are long and ranks high (then the mask's extra columns would cost more than the calls they
save). A run of one task needs no mask (its scaling is the GEMMs' ``alpha``). Tasks with rank
0 (no adapter at this layer) are in no run: their rows get zeros (or ``base``) and, when
between two tasks of a run, a zero mask.

IA3. ``z = h * v_i`` for every token of task i. Every segment length is a multiple of
``g = gcd(lens)`` (a whole number of rows of ``seq_len`` tokens in the runtime), so ``h`` is
viewed as ``(T/g, g, N)`` tiles of one task each and multiplied by the gathered per-tile
vectors in one broadcast op; ``dv`` is one tile sum plus one ``index_add_``.

Per-layout metadata (run plan, masks, tile index) is a pure function of the segment lengths
and ranks (and scalings, dtype, device for masks); it is built on first use and cached on the
step's `Segments` (shared by every layer) or in an LRU keyed by those values.

>>> segs = Segments.of([3, 2])
>>> lora_plan(segs.lens, (4, 8), 16, 16).runs
(Run(start=0, end=5, tasks=(0, 1), ranks=(4, 8)),)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch

from muxc.kernels import registry
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = [
    "Run",
    "LoraPlan",
    "lora_plan",
    "multi_lora_grouped",
    "multi_lora_bwd_grouped",
    "multi_ia3_grouped",
    "multi_ia3_bwd_grouped",
    "calls",
]

_CALLS: Counter = Counter()


def calls() -> dict[str, int]:
    """Calls per op served by this path since import (tests diff two snapshots)."""
    return dict(_CALLS)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- run planning
#
# Cost of one run, forward + backward (7 GEMMs: 2 forward, 5 backward). Measured on this
# project's 2-core CPU box, 1 thread, fp32, K = 384 (`x @ A^T` for 16-4096 rows, rank 4-180):
# a GEMM costs ~8 us fixed plus, per activation element it streams, the larger of ~0.3 ns
# (memory-bound up to ~20 rank columns) and ~0.014 ns per rank column (compute-bound above).
# The 7 GEMMs stream the run's rows 4 times at width K and 3 times at width N. A run of
# several tasks also stacks weights, applies masks, checks finiteness and splits gradients
# (~15 small ops of ~2 us).

_GEMM_NS = 8_000.0
_STREAM_NS = 0.3
_MAC_NS = 0.014
_GROUP_NS = 30_000.0


@dataclass(frozen=True)
class Run:
    """Rows ``start:end`` served by one set of GEMMs over ``tasks`` (rank > 0, in order)."""

    start: int
    end: int
    tasks: tuple[int, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class LoraPlan:
    """How one segment layout is served: runs, rows no run covers, tasks with no tokens."""

    runs: tuple[Run, ...]
    gaps: tuple[tuple[int, int], ...]
    idle: tuple[int, ...]
    """Tasks with rank > 0 but no tokens: their gradients are zeros."""


def _run_cost(rows: int, rank: int, k: int, n: int, tasks: int) -> float:
    per_elem = max(_STREAM_NS, _MAC_NS * rank)
    return 7 * _GEMM_NS + rows * (4 * k + 3 * n) * per_elem + (_GROUP_NS if tasks > 1 else 0.0)


@lru_cache(maxsize=1024)
def lora_plan(lens: tuple[int, ...], ranks: tuple[int, ...], k: int, n: int) -> LoraPlan:
    """Group adjacent tasks into runs minimising `_run_cost` (dynamic program, O(tasks^2))."""
    starts = [sum(lens[:i]) for i in range(len(lens))]
    active = [i for i, (m, r) in enumerate(zip(lens, ranks)) if m > 0 and r > 0]
    best = [0.0] + [math.inf] * len(active)
    cut = [0] * (len(active) + 1)
    for j in range(1, len(active) + 1):
        rank = 0
        for i in range(j - 1, -1, -1):  # run = active[i:j]
            rank += ranks[active[i]]
            rows = starts[active[j - 1]] + lens[active[j - 1]] - starts[active[i]]
            cost = best[i] + _run_cost(rows, rank, k, n, j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(active)
    while j > 0:
        i = cut[j]
        tasks = tuple(active[i:j])
        first, last = tasks[0], tasks[-1]
        runs.append(Run(starts[first], starts[last] + lens[last], tasks,
                        tuple(ranks[t] for t in tasks)))
        j = i
    runs.reverse()
    gaps, row = [], 0
    for run in runs:
        if run.start > row:
            gaps.append((row, run.start))
        row = run.end
    total = sum(lens)
    if total > row:
        gaps.append((row, total))
    idle = tuple(i for i, (m, r) in enumerate(zip(lens, ranks)) if m == 0 and r > 0)
    return LoraPlan(tuple(runs), tuple(gaps), idle)


@dataclass(frozen=True)
class _Mask:
    """A multi-task run's masks, ``(rows, R)``: ``off`` marks the entries outside each token's
    own task block, ``scale`` holds each task's scaling inside its block (0 elsewhere)."""

    off: torch.Tensor
    scale: torch.Tensor

    def apply_(self, u: torch.Tensor) -> torch.Tensor:
        """Zero ``u`` off the blocks, then scale. Zeroing by assignment, not by multiplying:
        ``0 * inf`` is NaN, and a task whose activations overflow must not reach the others."""
        return u.masked_fill_(self.off, 0.0).mul_(self.scale)


def _layout(x, segs: Segments, lora_a, lora_b, scaling, dtype) -> tuple[LoraPlan, tuple]:
    """The plan and, per run, its `_Mask` (None for a one-task run); cached on ``segs`` under
    everything they depend on."""
    ranks = tuple(a.shape[0] for a in lora_a)
    k, n = x.shape[1], lora_b[0].shape[0]
    key = ("grouped_lora", ranks, k, n, tuple(scaling), dtype, x.device)

    def build():
        plan = lora_plan(segs.lens, ranks, k, n)
        masks = []
        for run in plan.runs:
            if len(run.tasks) == 1:
                masks.append(None)
                continue
            scale = torch.zeros(run.end - run.start, sum(run.ranks), dtype=dtype)
            off = torch.ones(scale.shape, dtype=torch.bool)
            for t, (row, col) in _blocks(run, segs).items():
                scale[row, col] = float(scaling[t])
                off[row, col] = False
            masks.append(_Mask(off=off.to(x.device), scale=scale.to(x.device)))
        return plan, tuple(masks)

    return segs.cached(key, build)


def _blocks(run: Run, segs: Segments) -> dict[int, tuple[slice, slice]]:
    """Task -> (its rows, its rank columns) inside the run's ``(rows, R)`` intermediate."""
    out, col = {}, 0
    for t, r in zip(run.tasks, run.ranks):
        row = segs.starts[t] - run.start
        out[t] = (slice(row, row + segs.lens[t]), slice(col, col + r))
        col += r
    return out


def _stack(lora_a, lora_b, run: Run, dtype):
    if len(run.tasks) == 1:
        t = run.tasks[0]
        return lora_a[t].to(dtype), lora_b[t].to(dtype)
    a = torch.cat([lora_a[t] for t in run.tasks]).to(dtype)
    b = torch.cat([lora_b[t] for t in run.tasks], dim=1).to(dtype)
    return a, b


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every element is finite, read from the sums (one reduction each: ~15x cheaper
    than ``isfinite().all()`` here). A finite sum that overflows also answers False; the
    caller's per-task path is exact either way."""
    return math.isfinite(sum(float(t.sum()) for t in tensors))


# ----------------------------------------------------------------------------- LoRA
#
# Isolation. A multi-task run multiplies every token against every task's rank columns and
# reduces dA/dB over every token of the run; the masks zero the cross-task terms, but a GEMM
# still forms 0 * x for them, and 0 * inf = NaN. So a task whose tokens or adapter went
# non-finite could poison the others' results. The masks zero by assignment (`_Mask.apply_`),
# a run whose stacked weights are not finite is served task by task, and a backward run whose
# dA/dB came out non-finite is recomputed task by task: exact for every task, at the cost of
# a few small checks per multi-task run (one-task runs mix nothing and need none).


def multi_lora_grouped(x, segs: Segments, lora_a, lora_b, scaling, base=None) -> torch.Tensor:
    """Grouped forward: two GEMMs per run (see the module docstring); ``base + delta`` when
    ``base`` is given, computed in at least fp32 and rounded once to x's dtype."""
    _CALLS["multi_lora"] += 1
    acc = _acc(x.dtype)
    plan, masks = _layout(x, segs, lora_a, lora_b, scaling, acc)
    xa = x.to(acc)
    ba = None if base is None else base.to(acc)
    y = x.new_empty(x.shape[0], lora_b[0].shape[0], dtype=acc)
    for s, e in plan.gaps:
        if ba is None:
            y[s:e].zero_()
        else:
            y[s:e].copy_(ba[s:e])
    for run, mask in zip(plan.runs, masks):
        a, b = _stack(lora_a, lora_b, run, acc)
        s, e = run.start, run.end
        out = y[s:e]
        if mask is not None and not _finite(b):
            if ba is None:
                out.zero_()
            else:
                out.copy_(ba[s:e])
            for t, (rows, _) in _blocks(run, segs).items():
                u = torch.mm(xa[s:e][rows], lora_a[t].to(acc).t())
                out[rows].addmm_(u, lora_b[t].to(acc).t(), alpha=float(scaling[t]))
            continue
        u = torch.mm(xa[s:e], a.t())
        if mask is None:
            alpha = float(scaling[run.tasks[0]])
        else:
            mask.apply_(u)
            alpha = 1.0
        if ba is None:
            torch.addmm(out, u, b.t(), beta=0, alpha=alpha, out=out)
        else:
            torch.addmm(ba[s:e], u, b.t(), alpha=alpha, out=out)
    return y.to(x.dtype)


def multi_lora_bwd_grouped(dy, x, segs: Segments, lora_a, lora_b, scaling):
    """Grouped backward: ``(dx, [dA_i], [dB_i])`` with five GEMMs per run (``U`` is recomputed
    rather than saved by the forward)."""
    _CALLS["multi_lora_bwd"] += 1
    acc = _acc(x.dtype)
    plan, masks = _layout(x, segs, lora_a, lora_b, scaling, acc)
    xa, ga = x.to(acc), dy.to(acc)
    dx = x.new_empty(x.shape, dtype=acc)
    for s, e in plan.gaps:
        dx[s:e].zero_()
    da: list = [None] * len(lora_a)
    db: list = [None] * len(lora_b)
    for run, mask in zip(plan.runs, masks):
        a, b = _stack(lora_a, lora_b, run, acc)
        s, e = run.start, run.end
        xs, gs = xa[s:e], ga[s:e]
        if mask is not None and not _finite(a, b):
            dx[s:e].zero_()
            for t, (rows, _) in _blocks(run, segs).items():
                at, bt, sc = lora_a[t].to(acc), lora_b[t].to(acc), float(scaling[t])
                gu = torch.mm(gs[rows], bt).mul_(sc)
                torch.mm(gu, at, out=dx[s:e][rows])
                da[t] = torch.mm(gu.t(), xs[rows])
                db[t] = torch.mm(gs[rows].t(), torch.mm(xs[rows], at.t()).mul_(sc))
            continue
        gu = torch.mm(gs, b)
        u = torch.mm(xs, a.t())
        if mask is None:
            gu.mul_(float(scaling[run.tasks[0]]))
            u.mul_(float(scaling[run.tasks[0]]))
        else:
            mask.apply_(gu)
            mask.apply_(u)
        torch.mm(gu, a, out=dx[s:e])
        da_run = torch.mm(gu.t(), xs)
        db_run = torch.mm(gs.t(), u)
        if mask is None:
            da[run.tasks[0]], db[run.tasks[0]] = da_run, db_run
        elif _finite(da_run, db_run):
            for t, g in zip(run.tasks, torch.split_with_sizes_copy(da_run, run.ranks, 0)):
                da[t] = g
            for t, g in zip(run.tasks, torch.split_with_sizes_copy(db_run, run.ranks, 1)):
                db[t] = g
        else:  # some task's rows are not finite: reduce each task over its own rows only
            for t, (rows, cols) in _blocks(run, segs).items():
                da[t] = torch.mm(gu[rows, cols].t(), xs[rows])
                db[t] = torch.mm(gs[rows].t(), u[rows, cols])
    da = [torch.zeros_like(p) if g is None else g.to(p.dtype) for p, g in zip(lora_a, da)]
    db = [torch.zeros_like(p) if g is None else g.to(p.dtype) for p, g in zip(lora_b, db)]
    return dx.to(x.dtype), da, db


# ----------------------------------------------------------------------------- IA3


def _tiles(segs: Segments, device) -> tuple[int, torch.Tensor]:
    """``(g, tile_task)``: the tile length dividing every segment and each tile's task."""

    def build():
        g = math.gcd(*segs.lens) or 1
        per_task = torch.tensor([n // g for n in segs.lens])
        index = torch.repeat_interleave(torch.arange(len(segs)), per_task,
                                        output_size=segs.total // g)
        return g, index.to(device)

    return segs.cached(("grouped_ia3_tiles", str(device)), build)


def _scale_tiles(h, segs: Segments, vectors) -> torch.Tensor:
    if len(vectors) == 1:
        return h * vectors[0]
    g, index = _tiles(segs, h.device)
    n = h.shape[1]
    per_tile = torch.stack(vectors).index_select(0, index)
    return (h.view(-1, g, n) * per_tile.unsqueeze(1)).view(h.shape)


def multi_ia3_grouped(h, segs: Segments, vectors) -> torch.Tensor:
    """Grouped forward: one broadcast multiply over task tiles."""
    _CALLS["multi_ia3"] += 1
    if h.shape[0] == 0:
        return torch.empty_like(h)
    return _scale_tiles(h, segs, vectors)


def multi_ia3_bwd_grouped(dz, h, segs: Segments, vectors):
    """Grouped backward: ``dh`` as the forward, every ``dv_i`` from one tile sum and one
    ``index_add_`` (accumulated in at least fp32)."""
    _CALLS["multi_ia3_bwd"] += 1
    if h.shape[0] == 0:
        return torch.empty_like(h), [torch.zeros_like(v) for v in vectors]
    dh = _scale_tiles(dz, segs, vectors)
    acc = _acc(h.dtype)
    g, index = _tiles(segs, h.device)
    n = h.shape[1]
    sums = (dz.to(acc) * h.to(acc)).view(-1, g, n).sum(1)
    dv = sums.new_zeros(len(vectors), n).index_add_(0, index, sums)
    return dh, list(torch.unbind_copy(dv.to(vectors[0].dtype), 0))


# ----------------------------------------------------------------------------- registry


def _check(*tensors, forced: bool) -> str | None:
    t = tensors[0]
    if not t.is_floating_point():
        return f"dtype {t.dtype} is not a floating-point type; the grouped path needs one"
    return None


registry.register("multi_lora", Impl.GROUPED, multi_lora_grouped, _check)
registry.register("multi_lora_bwd", Impl.GROUPED, multi_lora_bwd_grouped, _check)
registry.register("multi_ia3", Impl.GROUPED, multi_ia3_grouped, _check)
registry.register("multi_ia3_bwd", Impl.GROUPED, multi_ia3_bwd_grouped, _check)
