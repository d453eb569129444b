"""`StepPricer`: `estimate_step`'s forward and backward seconds, fast, for the planner's search.

The fusion DP, the chunk-size choices and the final step plan price a few hundred step shapes
per step with fresh batches; `estimate_step` walks every op of the summary for each one (with
its by-kind breakdown), which made planning tens of milliseconds. A step's time splits into
parts that repeat across those shapes:

- the shared ops (no task): they depend only on (rows of one micro-batch, ``seq_len``,
  ``kv_len``);
- each task's own ops (its loss): on (that task's rows, ``seq_len``, ``kv_len``);
- the adapter sites: on the active tasks' rows and ``seq_len``;

so each part is priced once per distinct argument (memoised for the program's life, bounded)
and a shape's estimate is their sum. The sum equals `estimate_step`'s up to floating-point
rounding (terms are added in another order); tests/test_plan_pricing.py checks them against
each other, so a change to `estimate_step`'s formula has to be made here too.

Per micro-batch (``m`` of them, each with ``rows / m`` of every task's rows), as there::

    forward = m * (sum of op latencies + sites) + m * (calls * call_overhead + run_overhead)

less the autograd start (``backward_start``) on the forward side, which the backward pays.
"""

from __future__ import annotations

from collections import Counter

from muxc.plan.cost import CostModel, StepShape, site_seconds
from muxc.plan.ops import CostModelError
from muxc.plan.summary import KV, ModelSummary, Work

__all__ = ["StepPricer"]

_LIMIT = 1 << 15  # entries per memo before it is cleared (the planner reuses shapes step to step)


class StepPricer:
    """Forward and backward seconds of step shapes of one summary under one cost model."""

    def __init__(self, summary: ModelSummary, cost: CostModel):
        self.summary = summary
        self.cost = cost
        # ops without a task (None) and each task's own ops, forward and backward apart, equal
        # work merged: owner -> ([(kv, count, op)] forward, [...] backward), where an op is
        # (terms of its work polynomial, its key, {work: latency})
        merged: dict[str | None, tuple[Counter, Counter]] = {
            t: (Counter(), Counter()) for t in (None, *summary.tasks)}
        for f, g, task, kv, count in summary.grouped:
            fwd, bwd = merged.setdefault(task, (Counter(), Counter()))
            if f is not None:
                fwd[(kv, f)] += count
            if g is not None:
                bwd[(kv, g)] += count
        self._own = {t: tuple([(kv, n, self._op(w)) for (kv, w), n in c.items()] for c in fb)
                     for t, fb in merged.items()}
        self._memo: dict[tuple, tuple[float, float]] = {}
        self._parts: dict[tuple, tuple[float, float, int, int]] = {}
        self._site_memo: dict[tuple, tuple[float, float, int, int]] = {}
        # each site's tasks, and its one-site prices by (site, its tasks' rows, all rows, s):
        # the DP's groups share most sites' rows, so a site is priced once per such key
        self._site_tasks = tuple(frozenset(t for t, _, _ in members)
                                 for members, _ in summary.sites)
        self._one_site: dict[tuple, tuple] = {}
        self._saved: dict[tuple, float] = {}  # (task or None, rows, seq_len) -> saved bytes

    def activation_bytes(self, shape: StepShape) -> int:
        """`estimate_memory` ``(summary, shape).activations``: bytes one micro-batch of
        ``shape`` saves for backward, with its saves memoised per (task, rows, length)."""
        total = shape.total_rows
        if not total:
            return 0
        s = shape.seq_len
        acts = self._saved_bytes(None, total, s)
        for task, rows in shape.rows.items():
            if rows:
                acts += self._saved_bytes(task, rows, s)
        return int(round(acts + self._saved_bytes("", total, s)))

    def _saved_bytes(self, task: str | None, rows: float, s: int) -> float:
        """Saved bytes of the shared ops (``task`` None), of ``task``'s own ops, or the
        recomputed layers' peak (``task`` "")."""
        key = (task, rows, s)
        v = self._saved.get(key)
        if v is None:
            summary = self.summary
            poly = (summary.saved if task is None else summary.recompute_peak if task == ""
                    else summary.saved_per_task[task])
            if len(self._saved) > _LIMIT:
                self._saved.clear()
            v = self._saved[key] = poly(rows, s)
        return v

    @staticmethod
    def _op(w: Work | None):
        return None if w is None else (w.amount, w.key, {})

    def _latency(self, op, b: float, s: float, scale: float, backward: bool) -> float:
        """``cost.latency`` of ``op``'s work at ``b`` rows, length ``s``, times ``scale``
        (latencies memoised per op)."""
        work = op[0](b, s) * scale
        memo = op[2]
        t = memo.get(work)
        if t is None:
            if len(memo) > _LIMIT:
                memo.clear()
            t = memo[work] = self.cost.latency(op[1], work, backward)
        return t

    def __call__(self, shape: StepShape, micro_batches: int = 1) -> tuple[float, float]:
        """``(forward, backward)`` seconds of ``shape`` run as ``micro_batches`` calls of the
        graph: `estimate_step` ``(...).forward, .backward``, up to rounding."""
        rows = tuple(sorted((t, r) for t, r in shape.rows.items() if r))
        key = (rows, shape.seq_len, shape.kv_len, micro_batches)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        unknown = sorted(t for t in shape.rows if t is None or t not in self._own)
        if unknown or micro_batches < 1:
            raise CostModelError(f"StepPricer: tasks {unknown} are not in the summary (tasks "
                                 f"{list(self.summary.tasks)}) or micro_batches "
                                 f"{micro_batches} < 1")
        m = micro_batches
        s = shape.seq_len
        kv = s if shape.kv_len is None else shape.kv_len
        if not rows:
            out = (0.0, 0.0)
        else:
            total = sum(r for _, r in shape.rows.items())
            fwd, bwd, cf, cb = self._part(None, total / m, s, kv)
            for t, r in rows:
                pf, pb, pcf, pcb = self._part(t, r / m, s, kv)
                fwd, bwd, cf, cb = fwd + pf, bwd + pb, cf + pcf, cb + pcb
            sf, sb, scf, scb = self._site_part(tuple((t, r / m) for t, r in rows), float(s))
            cost = self.cost
            over = cost.call_overhead
            calls_b = cb + scb
            run_b = cost.backward_start if calls_b else 0.0
            out = (m * (fwd + sf) + m * ((cf + scf) * over + cost.run_overhead
                                         - cost.backward_start),
                   m * (bwd + sb) + m * (calls_b * over + run_b))
        if len(self._memo) > _LIMIT:
            self._memo.clear()
        self._memo[key] = out
        return out

    def _part(self, task: str | None, b: float, s: int, kv: int) -> tuple[float, float, int, int]:
        """Seconds (forward, backward) and op calls of one micro-batch's shared ops
        (``task`` None, ``b`` all rows) or ``task``'s own ops (``b`` its rows)."""
        key = (task, b, s, kv)
        hit = self._parts.get(key)
        if hit is not None:
            return hit
        latency = self._latency
        scales = {KV.NONE: 1.0, KV.TOTAL: kv / s, KV.PAST: (kv - s) / s}
        sf = float(s)
        fwd = bwd = 0.0
        cf = cb = 0
        forward, backward = self._own[task]
        for k, count, op in forward:
            scale = scales[k]
            if scale > 0:
                fwd += count * latency(op, b, sf, scale, False)
                cf += count
        for k, count, op in backward:
            scale = scales[k]
            if scale > 0:
                bwd += count * latency(op, b, sf, scale, True)
                cb += count
        out = (fwd, bwd, cf, cb)
        if len(self._parts) > _LIMIT:
            self._parts.clear()
        self._parts[key] = out
        return out

    def _site_part(self, rows: tuple[tuple[str, float], ...], s: float):
        """Seconds and op calls of one micro-batch's adapter sites for per-task ``rows``:
        `muxc.plan.cost`'s own per-site pricing (one call per kind serving its tasks, each
        extra task's cost, the neutral work on other tasks' tokens), memoised per rows."""
        key = (rows, s)
        hit = self._site_memo.get(key)
        if hit is not None:
            return hit
        total = sum(r for _, r in rows)
        fwd = bwd = 0.0
        cf = cb = 0
        for i, (members, count) in enumerate(self.summary.sites):
            tasks = self._site_tasks[i]
            mine = tuple((t, r) for t, r in rows if r and t in tasks)
            if not mine:
                continue
            one = (i, mine, total, s)
            priced = self._one_site.get(one)
            if priced is None:
                if len(self._one_site) > _LIMIT:
                    self._one_site.clear()
                # the site's own tasks' rows, and the others' as one neutral block (what
                # `site_seconds` reads of them: their total)
                rows_here = dict(mine)
                rest = total - sum(r for _, r in mine)
                if rest > 0:
                    rows_here[None] = rest
                priced = self._one_site[one] = site_seconds(self.cost, members, rows_here, s)
            tf, tb, kind, extra = priced
            fwd += count * tf
            bwd += count * tb
            if kind is not None:
                cf += count * (1 + extra[0])
                cb += count * ((tb > 0) + extra[1])
        out = (fwd, bwd, cf, cb)
        if len(self._site_memo) > _LIMIT:
            self._site_memo.clear()
        self._site_memo[key] = out
        return out
