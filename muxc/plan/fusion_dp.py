"""Fusion planning: which tasks to fuse spatially into hTasks (interleaved temporally).

`plan_fusion` is an exact dynamic program over tasks sorted by token load: hTasks are
contiguous runs of that order. For a plan ``H`` the objective is the predicted iteration time
of the interleaved pipeline (DESIGN.md mechanism 4)::

    T(H) = sum_h work(h) + (stages - 1) * max_h slot(h)

where ``work(h)`` is hTask ``h``'s busy time on one stage over all its micro-batches and
``slot(h)`` the time of one of its micro-batches on one stage (the fill/drain term is paid once
because hTasks interleave). Memory: ``fixed + stages * max_h activations(h) <= budget``, a
per-hTask bound. Growth stops at the saturation point: an hTask whose micro-batch would exceed
``saturation_tokens`` is not considered (single tasks always are). Exactness: the optimum's
max slot is one of the candidates' slots ``M``; for each ``M`` an additive DP over prefixes
minimises ``sum work`` with every slot <= M; the best ``sum + (stages-1)*M`` is optimal.

>>> cost = lambda tasks: GroupCost(work=1.0 + 0.1 * len(tasks), slot=1.0, activation_bytes=0, tokens=len(tasks))
>>> plan_fusion({"a": 10, "b": 20, "c": 30}, cost, stages=1).htasks
(('a', 'b', 'c'),)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import combinations

from muxc.errors import OptionsError
from muxc.ir.step import FusionPlan, GroupCost

__all__ = ["GroupCost", "FusionPlan", "plan_fusion", "objective", "brute_force",
           "contiguous_partitions"]


def objective(groups, cost: Callable[[tuple[str, ...]], GroupCost], stages: int) -> float:
    """The predicted iteration time ``T(H)`` of a plan (see module doc)."""
    costs = [cost(tuple(g)) for g in groups]
    return sum(c.work for c in costs) + (stages - 1) * max(c.slot for c in costs)


def plan_fusion(
    loads: Mapping[str, int],
    cost: Callable[[tuple[str, ...]], GroupCost],
    stages: int = 1,
    saturation_tokens: int | None = None,
    activation_budget: float | None = None,
    max_tasks: int | None = None,
    memory_slack: float = 0.0,
    shown_cost: Callable[[tuple[str, ...]], GroupCost] | None = None,
) -> FusionPlan:
    """Optimal hTasks for ``loads`` (task -> tokens per step) under ``cost``.

    ``memory_slack``: of the plans predicted within ``(1 + memory_slack)`` of the fastest, the
    one whose largest hTask holds the fewest activation bytes (fastest among those): with
    predictions this close the faster one is not known to be faster, the smaller peak is.

    ``activation_budget``: bytes of activations allowed per in-flight micro-batch, i.e.
    ``(memory_budget - fixed) / stages``; a single task over it raises `OptionsError`.
    ``max_tasks``: at most this many tasks per hTask (a retry after running out of memory).
    ``shown_cost``: prices the all-tasks alternative when the DP may not pick it (past
    saturation or the budget: it is only shown), where ``cost`` would be dear (default ``cost``).
    """
    order = sorted(loads, key=lambda t: (loads[t], t))
    n = len(order)
    if n == 0:
        raise OptionsError("no tasks to plan")
    cands: dict[tuple[int, int], GroupCost] = {}
    for i in range(n):
        for j in range(i + 1, n + 1):
            if max_tasks is not None and j - i > max(max_tasks, 1):
                break
            c = cost(tuple(order[i:j]))
            if j - i > 1 and saturation_tokens is not None and c.tokens > saturation_tokens:
                break  # sorted by load: longer runs only grow
            if activation_budget is not None and c.activation_bytes > activation_budget:
                if j - i == 1:
                    raise OptionsError(
                        f"task {order[i]!r} alone needs {c.activation_bytes:.3g} B of activations per "
                        f"micro-batch, over the budget's {activation_budget:.3g} B; raise memory_budget "
                        "or use smaller batches/chunks"
                    )
                break
            cands[(i, j)] = c
    best, best_groups = _solve(order, cands, stages, None)
    if best_groups is not None and memory_slack > 0:
        # the least activation cap whose best plan is within the slack of the fastest; a higher
        # cap only adds candidates, so the best time falls as the cap rises: bisect the caps
        caps = sorted({c.activation_bytes for c in cands.values()})  # infeasible below some
        lo, hi = 0, len(caps) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            t, _ = _solve(order, cands, stages, caps[mid])
            if t <= best * (1 + memory_slack):
                hi = mid
            else:
                lo = mid + 1
        best, best_groups = _solve(order, cands, stages, caps[lo])
    if best_groups is None:
        raise OptionsError("no fusion plan satisfies the memory budget; raise memory_budget")
    exact = objective(best_groups, cost, stages)
    alternatives = {
        "spatial": objective([tuple(order)], cost if (0, n) in cands or shown_cost is None
                             else shown_cost, stages),
        "temporal": objective([(t,) for t in order], cost, stages),
        "auto": exact,
    }
    spans = {"spatial": [(0, n)], "temporal": [(i, i + 1) for i in range(n)]}
    infeasible = tuple(name for name, runs in spans.items() if any(r not in cands for r in runs))
    return FusionPlan(htasks=best_groups, predicted=exact, alternatives=alternatives, infeasible=infeasible)


def _solve(order, cands, stages: int, cap: float | None):
    """The DP of the module doc over ``cands`` (those with at most ``cap`` bytes of
    activations): ``(predicted time, hTasks)``, ``(inf, None)`` without a feasible plan."""
    n = len(order)
    usable = cands if cap is None else {k: c for k, c in cands.items() if c.activation_bytes <= cap}
    best, best_groups = float("inf"), None
    for m in sorted({c.slot for c in usable.values()}):
        dp = [0.0] + [float("inf")] * n
        back = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):
                c = usable.get((i, j))
                if c is not None and c.slot <= m and dp[i] + c.work < dp[j]:
                    dp[j], back[j] = dp[i] + c.work, i
        if dp[n] == float("inf"):
            continue
        total = dp[n] + (stages - 1) * m
        if total < best - 1e-15:
            groups, j = [], n
            while j > 0:
                groups.append(tuple(order[back[j]:j]))
                j = back[j]
            best, best_groups = total, tuple(reversed(groups))
    return best, best_groups


def contiguous_partitions(order):
    """Every split of ``order`` into contiguous runs, as lists of tuples (for tests)."""
    n = len(order)
    for k in range(n):
        for cuts in combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            yield [tuple(order[a:b]) for a, b in zip(bounds, bounds[1:])]


def brute_force(loads: Mapping[str, int], cost, stages: int = 1, saturation_tokens=None, activation_budget=None):
    """Best contiguous partition of the sorted tasks by enumeration (for tests)."""
    order = sorted(loads, key=lambda t: (loads[t], t))
    best, best_groups = float("inf"), None
    for groups in contiguous_partitions(order):
        ok = True
        for g in groups:
            c = cost(g)
            if len(g) > 1 and saturation_tokens is not None and c.tokens > saturation_tokens:
                ok = False
            if activation_budget is not None and c.activation_bytes > activation_budget:
                ok = False
        if ok:
            v = objective(groups, cost, stages)
            if v < best - 1e-15:
                best, best_groups = v, tuple(groups)
    return best_groups, best
