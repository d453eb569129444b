"""Build pipeline schedules for hTasks: plain 1F1B, 1F1B interleaving hTasks, or sequential.

Dependencies (`pipeline_dependencies`), for micro-batch ``m`` of hTask ``h`` on stage ``s``:

- forward needs the forward on stage ``s − 1``;
- backward needs the backward on stage ``s + 1`` and its own forward on ``s``;
- with ``chained=True`` (chunk alignment: chunk ``m`` attends to the K/V kept from the
  hTask's earlier chunks) forward ``m`` also needs forward ``m − 1`` on the same stage, and
  backward ``m`` needs backward ``m + 1`` there (the K/V gradient flows back from later
  chunks). ``chained=False`` is pad alignment: micro-batches are independent.

Policies (`SchedulePolicy`), all deterministic, all one 1F1B rule over two sequences (the
order forwards enter a stage and the order backwards leave it):

- 1F1B rule: stage ``s`` keeps ``S − 1 − s`` warm-up forwards in flight beyond those its next
  backward needs, then alternates forward/backward, then cools down. With independent
  micro-batches this is textbook 1F1B (the k-th backward follows ``k + S − s`` forwards);
  with chained chunks an hTask's backward can only follow its last chunk's forward, so the
  warm-up counts from there.
- ``1f1b``: plain 1F1B, all hTasks' micro-batches as one sequence in hTask order (chained:
  each hTask's backwards last chunk first). At every hTask boundary of a chained schedule
  the stages wait for the new hTask's whole chunk chain: ``(S − 1)·b`` more idle time each.
- ``interleaved``: slots filled round-robin from the hTasks, right-aligned so all hTasks
  finish their forwards together (h0 m0, h1 m0, h0 m1, h1 m1 for two equal hTasks), and
  backwards round-robin in the order hTasks finish (chained: chunks last to first). One
  hTask's chunk chain is overlapped by the others' work; with uniform step times the
  makespan is the 1F1B optimum ``(Σ m + S − 1)·(f + b)``, at the price of holding up to every
  micro-batch's activations at once with chained chunks (simulate reports peak memory).
- ``sequential``: no overlap at all; for each hTask in turn, every micro-batch's forward
  through all stages, then every backward back through them (each step waits for the
  previous one: the single-process executor's timeline).

The frozen backbone has no weight-gradient step to defer (no ZeroBubble); interleaving
independent hTasks is what fills the bubbles.

>>> s = build_schedule([2], stages=2, policy="1f1b", chained=False)
>>> print(s.table())
stage | 0    1    2    3
    0 | F0.0 F0.1 B0.0 B0.1
    1 | F0.0 B0.0 F0.1 B0.1
>>> print(build_schedule([3, 3], 3, "1f1b", chained=True).table())
stage | 0    1    2    3    4    5    6    7    8    9    10   11
    0 | F0.0 F0.1 F0.2 F1.0 F1.1 B0.2 B0.1 B0.0 F1.2 B1.2 B1.1 B1.0
    1 | F0.0 F0.1 F0.2 F1.0 B0.2 B0.1 B0.0 F1.1 F1.2 B1.2 B1.1 B1.0
    2 | F0.0 F0.1 F0.2 B0.2 B0.1 B0.0 F1.0 F1.1 F1.2 B1.2 B1.1 B1.0
>>> print(build_schedule([3, 3], 3, "interleaved", chained=True).table())
stage | 0    1    2    3    4    5    6    7    8    9    10   11
    0 | F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 B0.2 B1.2 B0.1 B1.1 B0.0 B1.0
    1 | F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 B0.2 B1.2 B0.1 B1.1 B0.0 B1.0
    2 | F0.0 F1.0 F0.1 F1.1 F0.2 B0.2 F1.2 B1.2 B0.1 B1.1 B0.0 B1.0
"""

from __future__ import annotations

from collections.abc import Sequence

from muxc.ir.schedule import Schedule, SchedulePolicy, ScheduleError, Step, StepKind, _as_counts

__all__ = ["SchedulePolicy", "build_schedule", "pipeline_dependencies"]

F, B = StepKind.FORWARD, StepKind.BACKWARD


def _check_stages(stages: int) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ScheduleError(f"stages must be an int >= 1, got {stages!r}")


def pipeline_dependencies(
    micro_batches: Sequence[int], stages: int, chained: bool
) -> dict[Step, tuple[Step, ...]]:
    """Every step of the pipeline and the steps it needs first (see the module docstring).

    >>> deps = pipeline_dependencies([2], stages=2, chained=True)
    >>> deps[Step(0, StepKind.BACKWARD, 0, 0)]
    (Step(B s1 h0 m0), Step(F s0 h0 m0), Step(B s0 h0 m1))
    """
    counts = _as_counts(micro_batches)
    _check_stages(stages)
    deps: dict[Step, tuple[Step, ...]] = {}
    for h, m_h in enumerate(counts):
        for s in range(stages):
            for m in range(m_h):
                fwd: list[Step] = []
                if s > 0:
                    fwd.append(Step(s - 1, F, h, m))
                if chained and m > 0:
                    fwd.append(Step(s, F, h, m - 1))
                deps[Step(s, F, h, m)] = tuple(fwd)
                bwd: list[Step] = []
                if s < stages - 1:
                    bwd.append(Step(s + 1, B, h, m))
                bwd.append(Step(s, F, h, m))
                if chained and m + 1 < m_h:
                    bwd.append(Step(s, B, h, m + 1))
                deps[Step(s, B, h, m)] = tuple(bwd)
    return deps


def _htask_order(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(h, m) for h, m_h in enumerate(counts) for m in range(m_h)]


def _round_robin(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """hTasks' micro-batches round-robin, right-aligned: the ``d``-th from last micro-batch of
    every hTask run side by side, so hTasks with more micro-batches start earlier and all
    hTasks finish their forwards together (a left-aligned round-robin leaves the longest
    hTask alone at the end, where nothing can hide its backward chain's wait)."""
    return [
        (h, m_h - 1 - d) for d in reversed(range(max(counts))) for h, m_h in enumerate(counts)
        if d < m_h
    ]


def _backward_sequence(
    forward: list[tuple[int, int]], counts: tuple[int, ...], chained: bool
) -> list[tuple[int, int]]:
    """The backward sequence of a forward one. Independent micro-batches: the same order (as
    in 1F1B). Chained: hTasks round-robin in the order their forwards complete, each hTask's
    chunks last to first (its first backward can only follow its last forward)."""
    if not chained:
        return list(forward)
    last = {h: i for i, (h, _) in enumerate(forward)}
    by_completion = sorted(range(len(counts)), key=lambda h: last[h])
    return [
        (h, counts[h] - 1 - j) for j in range(max(counts)) for h in by_completion if j < counts[h]
    ]


def _one_f_one_b(
    counts: tuple[int, ...],
    stages: int,
    forward: list[tuple[int, int]],
    backward: list[tuple[int, int]],
    chained: bool,
) -> tuple[tuple[Step, ...], ...]:
    """Per-stage 1F1B orders for the given forward and backward sequences.

    1F1B keeps ``w_s = S − 1 − s`` warm-up forwards in flight on stage ``s`` beyond those the
    next backward needs. So the k-th backward is placed after
    ``n_s(k) = min(M, max(r(0..k)) + w_s)`` forwards, where ``r(k)`` is how many forwards of
    the forward sequence must have run on the stage for backward ``k`` to be runnable: its own
    forward's index + 1, or with chained chunks, that of its hTask's last chunk. With
    independent micro-batches in the same order both ways this is textbook 1F1B
    (``n_s(k) = min(M, k + S − s)``). ``n_s(k)`` never grows with ``s``: whenever a stage runs
    a backward before a forward, every later stage does too, so no stage waits on a step that
    waits on it (the orders cannot deadlock).
    """
    total = len(forward)
    position = {mb: i for i, mb in enumerate(forward)}
    last = {h: position[(h, m_h - 1)] for h, m_h in enumerate(counts)}
    order = []
    for s in range(stages):
        row: list[Step] = []
        placed = ready = 0  # forwards placed on this stage; forwards the backwards so far need
        for h, m in backward:
            ready = max(ready, (last[h] if chained else position[(h, m)]) + 1)
            need = min(total, ready + stages - 1 - s)
            while placed < need:
                fh, fm = forward[placed]
                row.append(Step(s, F, fh, fm))
                placed += 1
            row.append(Step(s, B, h, m))
        order.append(tuple(row))
    return tuple(order)


def _sequential(
    counts: tuple[int, ...], stages: int, chained: bool, deps: dict[Step, tuple[Step, ...]]
) -> tuple[tuple[Step, ...], ...]:
    """Per-stage orders of the no-overlap timeline; adds "previous step" edges to ``deps``."""
    timeline: list[Step] = []
    for h, m_h in enumerate(counts):
        for m in range(m_h):
            timeline.extend(Step(s, F, h, m) for s in range(stages))
        for m in reversed(range(m_h)) if chained else range(m_h):
            timeline.extend(Step(s, B, h, m) for s in reversed(range(stages)))
    for prev, step in zip(timeline, timeline[1:]):
        if prev not in deps[step]:
            deps[step] = (*deps[step], prev)
    return tuple(tuple(st for st in timeline if st.stage == s) for s in range(stages))


def build_schedule(
    micro_batches: Sequence[int],
    stages: int,
    policy: SchedulePolicy | str = SchedulePolicy.INTERLEAVED,
    chained: bool = False,
) -> Schedule:
    """The validated schedule of ``micro_batches[h]`` micro-batches of each hTask ``h``.

    micro_batches: one count >= 1 per hTask (chunk steps with chunk alignment).
    stages: pipeline stages >= 1. policy: "1f1b" | "interleaved" | "sequential".
    chained: chunk alignment (each hTask's micro-batches depend on each other, see above).

    >>> build_schedule([4, 4], stages=4, policy="interleaved", chained=True)
    Schedule(interleaved, 4 stages, 2 hTasks, micro-batches [4, 4], chained, 64 steps)
    """
    counts = _as_counts(micro_batches)
    _check_stages(stages)
    pol = SchedulePolicy.parse(policy)
    chained = bool(chained)
    deps = pipeline_dependencies(counts, stages, chained)
    if pol is SchedulePolicy.SEQUENTIAL:
        order = _sequential(counts, stages, chained, deps)
    else:
        plain = pol is SchedulePolicy.ONE_F_ONE_B
        forward = _htask_order(counts) if plain else _round_robin(counts)
        if chained and plain:  # hTask by hTask, each one's chunks last to first
            backward = [(h, m) for h, m_h in enumerate(counts) for m in reversed(range(m_h))]
        else:
            backward = _backward_sequence(forward, counts, chained)
        order = _one_f_one_b(counts, stages, forward, backward, chained)
    schedule = Schedule(
        stages=stages, order=order, deps=deps, policy=pol.value, micro_batches=counts,
        chained=chained,
    )
    return schedule.validate()
