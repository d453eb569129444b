"""`LatencyModel`: latency flat below a saturation point, linear above it, fit from samples.

A kernel given little work is bound by launch/dispatch overhead and idle hardware: its time
barely moves as work grows (*flat*). Past the *saturation point* the device is busy and time
grows linearly with work. The model is ``max(flat, intercept + slope * work)``; the knee is
where the two meet.

`fit_latency` tries every split of the sorted samples into a flat prefix and a linear suffix
(weighted least squares on relative error, so small and large samples count alike) and keeps
the split whose combined model fits all samples best. Noise-free samples give the exact knee.

Real curves have more than two regimes (on a CPU an elementwise op is overhead-bound, then
runs at cache bandwidth, then at DRAM bandwidth), so inside the profiled range `predict`
interpolates the measured medians (made non-decreasing); the flat/linear fit gives the
saturation point and extrapolates past the largest sample (continuing from it with the fitted
slope) and below the smallest.

>>> xs = [16, 32, 64, 128, 256, 512, 1024]
>>> ys = [max(1.0, 0.01 * x) for x in xs]          # flat at 1.0, linear past x = 100
>>> m = fit_latency(xs, ys)
>>> round(m.saturation, 6), round(m.predict(2048), 6)
(100.0, 20.48)
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from muxc.plan.ops import CostModelError

__all__ = ["LatencyModel", "fit_latency"]


@dataclass(frozen=True)
class LatencyModel:
    """``predict(w) = max(flat, intercept + slope * w)`` seconds for work ``w``.

    ``saturation``: the work past which latency grows linearly (the knee; the smallest sample
    when every sample was already linear). ``samples``: how many distinct work sizes it was
    fit on (0 for a hand-made model). ``points``: measured ``(work, seconds)`` medians, sorted
    and non-decreasing, that `predict` interpolates between (empty: the fit alone).
    """

    flat: float
    intercept: float
    slope: float
    saturation: float
    samples: int = 0
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        coefficients = (self.flat, self.intercept, self.slope, self.saturation)
        if not all(math.isfinite(v) for v in coefficients):
            raise CostModelError(f"latency model has a non-finite coefficient: {self}")
        if self.slope < 0:
            raise CostModelError(f"latency model slope must be >= 0, got {self.slope}")

    def fitted(self, work: float) -> float:
        """The flat/linear fit alone at ``work``."""
        return max(self.flat, self.intercept + self.slope * work)

    def predict(self, work: float) -> float:
        """Seconds for ``work`` units (0 for no work); see the module doc."""
        if work <= 0:
            return 0.0
        pts = self.points
        if not pts:
            return self.fitted(work)
        if work <= pts[0][0]:
            return min(pts[0][1], self.fitted(work))
        if work >= pts[-1][0]:
            return pts[-1][1] + self.slope * (work - pts[-1][0])
        i = bisect.bisect_right([p[0] for p in pts], work)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (work - x0) / (x1 - x0)

    @staticmethod
    def constant(seconds: float, samples: int = 0) -> LatencyModel:
        return LatencyModel(seconds, seconds, 0.0, 0.0, samples)


def _median_by_work(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    groups: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        groups.setdefault(float(x), []).append(float(y))
    keys = sorted(groups)
    return keys, [statistics.median(groups[k]) for k in keys]


def _wls_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Intercept and slope minimising sum(((a + b x - y) / y)^2); None when degenerate."""
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    sy = sum(wi * y for wi, y in zip(w, ys))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    if det <= 0 or not math.isfinite(det):
        return None
    slope = (sw * sxy - sx * sy) / det
    return (sy - slope * sx) / sw, slope


def _rel_sse(model: LatencyModel, xs: list[float], ys: list[float]) -> float:
    return sum(((model.predict(x) - y) / y) ** 2 for x, y in zip(xs, ys))


def fit_latency(work: Sequence[float], seconds: Sequence[float]) -> LatencyModel:
    """Fit a flat-then-linear `LatencyModel` to samples (repeats at one work size: median).

    Needs at least one sample with positive work and time; one distinct size gives a
    constant model.
    """
    if len(work) != len(seconds):
        raise CostModelError(f"{len(work)} work sizes but {len(seconds)} timings")
    pairs = [(x, y) for x, y in zip(work, seconds) if x > 0 and y > 0 and math.isfinite(y)]
    if not pairs:
        raise CostModelError("no usable latency samples (need work > 0 and seconds > 0)")
    xs, ys = _median_by_work([p[0] for p in pairs], [p[1] for p in pairs])
    n = len(xs)
    flat_all = math.exp(sum(math.log(y) for y in ys) / n)  # best constant in relative terms
    best = LatencyModel.constant(flat_all, n)
    best_err = _rel_sse(best, xs, ys)
    for j in range(n - 1):  # j flat samples, n - j >= 2 on the line
        line = _wls_line(xs[j:], ys[j:])
        if line is None or line[1] <= 0:
            continue
        a, b = line
        if j == 0:
            flat, knee = a + b * xs[0], xs[0]
        else:
            head = ys[:j]
            flat = sum(1.0 / y for y in head) / sum(1.0 / (y * y) for y in head)
            knee = max((flat - a) / b, 0.0)
        if flat <= 0:
            continue
        cand = LatencyModel(flat, a, b, knee, n)
        err = _rel_sse(cand, xs, ys)
        if err < best_err * (1 - 1e-12):
            best, best_err = cand, err
    ys_mono = []
    for y in ys:
        ys_mono.append(max(y, ys_mono[-1]) if ys_mono else y)
    return replace(best, points=tuple(zip(xs, ys_mono)))
