"""Predicted step time of a merged program: per-op latency models summed over a summary.

`CostModel` prices ``work`` units of an `OpKey`: from a `LatencyModel` fitted to the
`DeviceProfile`'s samples for that key (flat below saturation, linear above), else from the
roofline (the profile's measured peaks, or datasheet peaks without a profile).
`estimate_step` sums it over a `ModelSummary` (or a `MuxGraph`, summarised on the fly) for one
step of given tokens per task; backward is priced by the ops' own backward samples (a frozen
GEMM's backward is one dX GEMM; adapters compute dx, dA, dB).

Every op *call* has a fixed cost besides its work (dispatch, Python, autograd bookkeeping,
kernel launch). A step run as ``micro_batches`` calls of the graph (chunk steps, pad row
splits) calls every op that many times on a share of the work, so the fitted latencies (flat
below saturation) are paid per call, plus ``CostModel.call_overhead`` per op call: what an op
costs inside a traced graph beyond its own latency (`muxc.plan.profile.measure_call_overhead`;
0 for a roofline-only model, whose per-op ``overhead`` is in every latency), and once per
micro-batch ``CostModel.run_overhead``: calling the graph and starting the autograd engine
(`muxc.plan.profile.measure_run_overhead`; the engine start is taken out of the profiled
backward samples, each of which paid it). On CPU these, not FLOPs, make small chunks slow.

Adapters are profiled as a real site calls them (the site's Python, the kind's ``apply``, one
multi-task kernel call); at a site shared by several tasks one call per kind serves them all,
so the fixed cost of all but the dearest is taken off, and each task beyond the first adds
``CostModel.site_task`` (measured: `muxc.plan.profile.measure_site_task_overhead`).

With ``summary = summarize_graph(program.mux)`` of a compiled program and a measured profile
(not run here: it needs a compiled program and times the machine):

>>> cost = CostModel(profile_device("cpu", summary.op_keys()))            # doctest: +SKIP
>>> est = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=256, cost=cost)  # doctest: +SKIP
>>> est                                                                   # doctest: +SKIP
StepEstimate(1024 tokens (1024 padded), fwd 11.2 ms + bwd 17.9 ms = 29.1 ms)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from muxc.ir import MuxGraph
from muxc.plan.latency import LatencyModel, fit_latency
from muxc.plan.ops import CostModelError, OpKey, OpKind, Roofline, roofline_latency
from muxc.plan.profile import DeviceProfile
from muxc.plan.summary import KV, ModelSummary, Work, as_summary

__all__ = ["CostModel", "StepEstimate", "StepShape", "estimate_step", "saturation_tokens",
           "site_seconds"]


class CostModel:
    """Latency of any op: fitted to a profile where it has samples, roofline elsewhere.

    Immutable after construction (every key of the profile is fitted up front).

    >>> cost = CostModel(roofline=Roofline(1e12, 1e11, 0.0))
    >>> cost.latency(OpKey(OpKind.GEMM, (1000, 1000)), 1000)
    0.002
    """

    def __init__(self, profile: DeviceProfile | None = None, roofline: Roofline | None = None,
                 call_overhead: float | None = None, run_overhead: float | None = None,
                 site_task: tuple[float, float] | None = None):
        if profile is None and roofline is None:
            roofline = Roofline.for_device("cpu")
        self.profile = profile
        self.roofline = roofline if roofline is not None else profile.roofline()
        if call_overhead is None:
            call_overhead = profile.call_overhead if profile is not None else 0.0
        if run_overhead is None:
            run_overhead = (profile.run_overhead if profile is not None
                            else self.roofline.run_overhead)
        if site_task is None:  # roofline: one launch serves every task at a site
            site_task = ((profile.site_task_forward, profile.site_task_backward)
                         if profile is not None else (0.0, 0.0))
        for name, v in (("call_overhead", call_overhead), ("run_overhead", run_overhead),
                        ("site_task", min(site_task))):
            if not v >= 0:
                raise CostModelError(f"{name} must be >= 0 seconds, got {v}")
        self.call_overhead = float(call_overhead)
        self.run_overhead = float(run_overhead)
        self.site_task = (float(site_task[0]), float(site_task[1]))
        # every probe's backward sample also started the autograd engine, which a graph's
        # backward does once per micro-batch (`run_overhead`): fit the ops without it
        start = min(profile.backward_start, self.run_overhead) if profile is not None else 0.0
        self.backward_start = start
        fits: dict[tuple[OpKey, bool], LatencyModel] = {}
        if profile is not None:
            for k, rows in profile.samples.items():
                key = OpKey.parse(k)
                fits[(key, False)] = fit_latency([s.work for s in rows], [s.forward for s in rows])
                bw = [s.work if s.backward_work is None else s.backward_work for s in rows]
                if any(s.backward > 0 for s in rows):
                    fits[(key, True)] = fit_latency(
                        bw, [max(s.backward - start, s.backward / 4) for s in rows])
        self._fits = fits
        self._memo: dict[tuple[OpKey, float, bool], float] = {}

    @staticmethod
    def load(path: str | Path) -> CostModel:
        """A cost model from a profile saved with `DeviceProfile.save`."""
        return CostModel(DeviceProfile.load(path))

    @staticmethod
    def for_device(device: torch.device | str, dtype: str = "float32") -> CostModel:
        """Roofline only, from the datasheet peaks of ``device`` (no profile needed).

        >>> CostModel.for_device("cpu").roofline.peak_flops
        100000000000.0
        """
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return CostModel(roofline=Roofline.for_device(name, dtype))

    def __repr__(self) -> str:
        src = repr(self.profile) if self.profile is not None else repr(self.roofline)
        return f"CostModel({src}, {len(self._fits)} fitted)"

    def model(self, key: OpKey, backward: bool = False) -> LatencyModel | None:
        """The fitted latency model of ``key`` (None: it falls back to the roofline)."""
        return self._fits.get((key, backward))

    def latency(self, key: OpKey, work: float, backward: bool = False) -> float:
        """Seconds for ``work`` units of ``key`` (its backward when ``backward``)."""
        memo = (key, work, backward)
        t = self._memo.get(memo)
        if t is None:
            m = self._fits.get((key, backward))
            t = m.predict(work) if m is not None else roofline_latency(self.roofline, key, work, backward)
            if len(self._memo) > 1 << 16:  # the planner prices the same shapes step after step
                self._memo.clear()
            self._memo[memo] = t
        return t

    def saturation(self, key: OpKey) -> float | None:
        """Work (in the key's unit) past which the forward grows linearly; None if unfitted."""
        m = self._fits.get((key, False))
        return None if m is None else m.saturation

    def fitted(self) -> list[OpKey]:
        return sorted({k for k, _ in self._fits})


@dataclass(frozen=True)
class StepShape:
    """How a step lays out its tokens: rows per task, right-padded to ``seq_len``.

    ``kv_len``: keys each query attends to (chunked attention: earlier chunks + this one);
    None means ``seq_len``.

    >>> StepShape.from_tokens({"a": 300, "b": 100}, seq_len=128).rows
    {'a': 3, 'b': 1}
    """

    rows: Mapping[str, int]
    seq_len: int
    kv_len: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 1 or any(r < 0 for r in self.rows.values()):
            raise CostModelError(f"bad step shape: seq_len={self.seq_len}, rows={dict(self.rows)}")
        if self.kv_len is not None and self.kv_len < self.seq_len:
            raise CostModelError(f"kv_len ({self.kv_len}) counts this chunk's own keys too: it "
                                 f"must be >= seq_len ({self.seq_len})")

    @staticmethod
    def from_tokens(
        tokens_per_task: Mapping[str, int], seq_len: int, kv_len: int | None = None
    ) -> StepShape:
        """Each task's tokens cut into rows of ``seq_len`` (the last one padded)."""
        if seq_len < 1:
            raise CostModelError(f"seq_len must be >= 1, got {seq_len}")
        rows = {t: math.ceil(n / seq_len) for t, n in tokens_per_task.items()}
        return StepShape(rows, seq_len, kv_len)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def padded_tokens(self) -> int:
        return self.total_rows * self.seq_len


@dataclass(frozen=True)
class StepEstimate:
    """Predicted seconds of one forward+backward step, with a breakdown by op kind."""

    forward: float
    backward: float
    tokens: int
    padded_tokens: int
    by_kind: Mapping[str, float]
    calls: int = 0  # op calls (forward and backward) over all micro-batches
    micro_batches: int = 1

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __repr__(self) -> str:
        mb = f", {self.micro_batches} micro-batches" if self.micro_batches > 1 else ""
        return (f"StepEstimate({self.tokens} tokens ({self.padded_tokens} padded){mb}, "
                f"fwd {self.forward * 1e3:.1f} ms + bwd {self.backward * 1e3:.1f} ms = "
                f"{self.total * 1e3:.1f} ms)")


def _price(cost: CostModel, w: Work | None, b: float, s: float, scale: float,
           backward: bool) -> float:
    if w is None or scale <= 0:
        return 0.0
    return cost.latency(w.key, w.amount(b, s) * scale, backward)


def _calls(w: Work | None, scale: float) -> int:
    return int(w is not None and scale > 0)


def estimate_step(
    model: ModelSummary | MuxGraph,
    tokens_per_task: Mapping[str, int] | StepShape,
    *,
    cost: CostModel,
    seq_len: int | None = None,
    kv_len: int | None = None,
    micro_batches: int = 1,
) -> StepEstimate:
    """Predicted forward+backward seconds of one step of ``model``.

    ``tokens_per_task``: task -> tokens this step (cut into rows of ``seq_len``, padded), or a
    `StepShape`. Tasks absent or with 0 tokens are inactive (no adapter or loss cost).
    ``micro_batches``: the step runs as that many forward+backward calls of the graph, each on
    an equal share of the rows (chunk steps, or pad mode's row splits): every op is called
    that many times, paying its fixed cost each time, on a share of the work.
    """
    if micro_batches < 1:
        raise CostModelError(f"micro_batches must be >= 1, got {micro_batches}")
    summary = as_summary(model)
    if isinstance(tokens_per_task, StepShape):
        shape = tokens_per_task
        tokens = shape.padded_tokens
    else:
        if seq_len is None:
            raise CostModelError("estimate_step needs seq_len with a tokens-per-task mapping")
        shape = StepShape.from_tokens(tokens_per_task, seq_len, kv_len)
        tokens = sum(tokens_per_task.values())
    unknown = sorted(set(shape.rows) - set(summary.tasks))
    if unknown:
        raise CostModelError(
            f"estimate_step: tasks {unknown} are not in the summary (tasks {list(summary.tasks)})"
        )
    m = micro_batches
    b, s = shape.total_rows / m, float(shape.seq_len)  # rows of one (average) micro-batch
    kv_len = shape.seq_len if shape.kv_len is None else shape.kv_len
    scales = {KV.NONE: 1.0, KV.TOTAL: kv_len / shape.seq_len,
              KV.PAST: (kv_len - shape.seq_len) / shape.seq_len}
    fwd = bwd = 0.0
    calls_f = calls_b = 0  # op calls of one micro-batch
    by_kind: dict[str, float] = {}
    if shape.total_rows == 0:
        return StepEstimate(0.0, 0.0, 0, 0, {})
    for f, g, task, kv, count in summary.grouped:
        if task is None:
            rows = b
        else:
            rows = shape.rows.get(task, 0) / m
            if rows == 0:
                continue
        tf = count * m * _price(cost, f, rows, s, scales[kv], False)
        tb = count * m * _price(cost, g, rows, s, scales[kv], True)
        calls_f += count * _calls(f, scales[kv])
        calls_b += count * _calls(g, scales[kv])
        fwd += tf
        bwd += tb
        for w, t in ((f, tf), (g, tb)):
            if w is not None:
                by_kind[w.key.kind.value] = by_kind.get(w.key.kind.value, 0.0) + t
    per_task = {t: r / m for t, r in shape.rows.items()}
    for members, count in summary.sites:
        tf, tb, kind, extra = site_seconds(cost, members, per_task, s)
        fwd += count * m * tf
        bwd += count * m * tb
        if kind is not None:
            calls_f += count * (1 + extra[0])
            calls_b += count * ((tb > 0) + extra[1])
            by_kind[kind] = by_kind.get(kind, 0.0) + count * m * (tf + tb)
    # every op call's fixed cost, and every run of the graph's (calling it, starting the
    # autograd engine): m micro-batches pay them m times
    run_b = cost.backward_start if calls_b else 0.0
    over_f = m * (calls_f * cost.call_overhead + cost.run_overhead - cost.backward_start)
    over_b = m * (calls_b * cost.call_overhead + run_b)
    if over_f + over_b > 0:
        by_kind["overhead"] = over_f + over_b
    return StepEstimate(fwd + over_f, bwd + over_b, tokens, shape.padded_tokens, by_kind,
                        calls=m * (calls_f + calls_b), micro_batches=m)


def site_seconds(cost: CostModel, members, rows: Mapping[str, float], s: float):
    """One adapter site: each active task's adapter latency, less the fixed call cost
    (latency at one token) of all but the dearest of each kind, since one kernel call per
    kind serves all its tasks, plus what each task beyond the first adds to that call
    (`CostModel.site_task`: its arguments and segment bookkeeping). Per-call work (DoRA's
    weight norm, a P-tuning encoder) is each task's own.

    A kind's call runs over every active task's tokens, giving the tasks without that kind a
    neutral adapter (`_neutral`): IA3 scales their tokens by ones, LoRA copies their segment
    of the base output (and zeroes its input gradient)."""
    fwd = bwd = 0.0
    over_f: dict[OpKind, list[float]] = {}
    over_b: dict[OpKind, list[float]] = {}
    own: dict[OpKind, list] = {}  # kind -> [forward key, backward key, rows with that kind]
    kind = None
    for task, f, g in members:
        r = rows.get(task, 0)
        if not r:
            continue
        kind = kind or f.key.kind.value
        fwd += cost.latency(f.key, f.amount(r, s))
        if all(i == 0 and j == 0 for i, j, _ in f.amount.terms):
            continue  # per-call work, not the kind's kernel call
        entry = own.setdefault(f.key.kind, [f.key, None if g is None else g.key, 0.0])
        entry[2] += r
        over_f.setdefault(f.key.kind, []).append(cost.latency(f.key, 1.0))
        if g is not None:
            bwd += cost.latency(g.key, g.amount(r, s), True)
            over_b.setdefault(g.key.kind, []).append(cost.latency(g.key, 1.0, True))
    for over, task_cost, sign in ((over_f, cost.site_task[0], 0), (over_b, cost.site_task[1], 1)):
        saved = sum(sum(v) - max(v) for v in over.values())
        added = task_cost * sum(len(v) - 1 for v in over.values())
        if sign:
            bwd += added - saved
        else:
            fwd += added - saved
    total = sum(rows.values())
    calls = [0, 0]  # extra op calls: LoRA's copy of the neutral tokens, and its backward
    for key, gkey, mine in own.values():
        nf, nb = _neutral(cost, key, gkey, mine * s, (total - mine) * s)
        fwd += nf
        bwd += nb
        if key.kind is OpKind.LORA and total > mine:
            calls[0] += 1
            calls[1] += gkey is not None
    return fwd, bwd, kind, calls


def _neutral(cost: CostModel, key: OpKey, gkey: OpKey | None, mine: float,
             others: float) -> tuple[float, float]:
    """Forward and backward seconds a kind's site call spends on ``others`` tokens of tasks
    without that kind (``mine``: its own tasks' tokens): IA3 scales them by ones (its work on
    all the tokens less its work on its own); LoRA copies them from the base output and zeroes
    their input gradient (memory-bound; `muxc.kernels.grouped`)."""
    if others <= 0:
        return 0.0, 0.0
    if key.kind is OpKind.IA3:
        f = cost.latency(key, mine + others) - cost.latency(key, mine)
        b = 0.0 if gkey is None else (cost.latency(gkey, mine + others, True)
                                      - cost.latency(gkey, mine, True))
        return max(f, 0.0), max(b, 0.0)
    if key.kind is OpKind.LORA:
        k, n, _ = key.shape
        ew = _elementwise(key.dtype)
        f = cost.latency(ew, 2.0 * others * n * key.itemsize)
        b = 0.0 if gkey is None else cost.latency(ew, others * k * key.itemsize, True)
        return f, b
    return 0.0, 0.0


@lru_cache(maxsize=None)
def _elementwise(dtype: str) -> OpKey:
    """The elementwise op key of ``dtype`` (built once: the planner prices sites often)."""
    return OpKey(OpKind.ELEMENTWISE, dtype=dtype)


def saturation_tokens(
    model: ModelSummary | MuxGraph,
    *,
    cost: CostModel,
    seq_len: int,
    task: str | None = None,
    tolerance: float = 0.1,
    max_tokens: int = 1 << 20,
) -> int:
    """Tokens per step past which doubling them improves time per token by < ``tolerance``.

    This is the point where fusing more tasks spatially stops paying (the planner stops
    growing an hTask there). All tokens go to ``task`` (default: the first task), in rows of
    ``seq_len``; returns ``max_tokens`` if never saturated below it.
    """
    summary = as_summary(model)
    task = summary.tasks[0] if task is None else task
    t = seq_len
    per = estimate_step(summary, {task: t}, cost=cost, seq_len=seq_len).total / t
    while t < max_tokens:
        nxt = estimate_step(summary, {task: 2 * t}, cost=cost, seq_len=seq_len).total / (2 * t)
        if nxt >= (1.0 - tolerance) * per:
            return t
        t, per = 2 * t, nxt
    return max_tokens
