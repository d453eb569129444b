"""Schedule IR, builders, simulator and Gantt charts (muxc.ir.schedule, muxc.plan.schedule/simulate, muxc.dump.gantt). CPU only, fast."""

from __future__ import annotations

import itertools
import sys

import pytest

from muxc.errors import MuxcError
from muxc.dump.gantt import GanttUnavailableError, gantt_png, gantt_text
from muxc.ir import Schedule, ScheduleError, SimResult, Step, StepKind
from muxc.plan import (
    SchedulePolicy,
    best_schedule,
    build_schedule,
    pipeline_dependencies,
    simulate,
    time_table,
)

F, B = StepKind.FORWARD, StepKind.BACKWARD
POLICIES = [p.value for p in SchedulePolicy]

# Per-hTask micro-batch counts: every uniform shape for 1..4 hTasks and 1..6 micro-batches,
# every uneven pair, uneven triples, and uneven quadruples (incl. counts below the stages).
SHAPES = sorted(
    {(m,) * h for h in range(1, 5) for m in range(1, 7)}
    | set(itertools.product(range(1, 7), repeat=2))
    | set(itertools.product((1, 2, 5), repeat=3))
    | {(1, 6, 2, 5), (6, 1, 1, 1), (3, 1, 4, 1), (2, 2, 6, 1), (5, 4, 3, 2), (1, 2, 3, 6)}
)


def unit(step: Step) -> float:
    return 1.0


def check_simulation(schedule: Schedule, result: SimResult, comm: float = 0.0) -> None:
    """Independent check of a simulation: stages run their order without overlap, every step
    starts after its dependencies (+ comm across stages), and no step starts later than the
    tightest of those constraints (no needless idling)."""
    for row in schedule.order:
        for prev, step in zip(row, row[1:]):
            assert result.start[step] >= result.end[prev] - 1e-12
    for row in schedule.order:
        for i, step in enumerate(row):
            bounds = [result.end[row[i - 1]]] if i else [0.0]
            for dep in schedule.deps_of(step):
                extra = comm if dep.stage != step.stage else 0.0
                assert result.start[step] >= result.end[dep] + extra - 1e-12
                bounds.append(result.end[dep] + extra)
            assert result.start[step] == pytest.approx(max(bounds))


# ---- validity of every policy ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chained", [False, True])
def test_every_policy_builds_a_valid_complete_schedule(policy, chained):
    for stages in range(1, 5):
        for counts in SHAPES:
            s = build_schedule(counts, stages, policy, chained)
            assert s.validate() is s
            assert s.stages == stages and s.micro_batches == counts and s.chained is chained
            expected = {
                Step(st, k, h, m)
                for st in range(stages) for k in (F, B)
                for h, m_h in enumerate(counts) for m in range(m_h)
            }
            for st, row in enumerate(s.order):
                assert set(row) == {x for x in expected if x.stage == st}
                assert len(row) == 2 * sum(counts)
            structural = pipeline_dependencies(counts, stages, chained)
            for step, before in structural.items():  # the builder keeps every structural dep
                assert set(before) <= set(s.deps_of(step)), (policy, counts, step)
            if policy != "sequential":
                assert dict(s.deps) == structural


def test_one_f_one_b_is_textbook_for_independent_micro_batches():
    # Stage s: S-1-s warm-up forwards, then (F, B) pairs, then the cool-down backwards.
    s = build_schedule([6], stages=4, policy="1f1b")
    for st, row in enumerate(s.order):
        kinds = "".join(x.kind.value for x in row)
        warm = 4 - 1 - st
        assert kinds == "F" * warm + "FB" * (6 - warm) + "B" * warm
        assert [x.micro_batch for x in row if x.is_forward] == list(range(6))
        assert [x.micro_batch for x in row if not x.is_forward] == list(range(6))


def test_interleaved_fills_slots_round_robin_and_chained_backwards_run_last_chunk_first():
    s = build_schedule([3, 3], stages=2, policy="interleaved", chained=True)
    fwd = [(x.htask, x.micro_batch) for x in s.order[0] if x.is_forward]
    bwd = [(x.htask, x.micro_batch) for x in s.order[0] if not x.is_forward]
    assert fwd == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert bwd == [(0, 2), (1, 2), (0, 1), (1, 1), (0, 0), (1, 0)]
    # uneven: right-aligned, so the longer hTask starts first and both finish together
    s = build_schedule([3, 1], stages=2, policy="interleaved", chained=False)
    assert [(x.htask, x.micro_batch) for x in s.order[1] if x.is_forward] == [
        (0, 0), (0, 1), (0, 2), (1, 0)
    ]


def test_dependencies_are_data():
    deps = pipeline_dependencies([3], stages=3, chained=True)
    assert deps[Step(1, F, 0, 1)] == (Step(0, F, 0, 1), Step(1, F, 0, 0))
    assert deps[Step(1, B, 0, 1)] == (Step(2, B, 0, 1), Step(1, F, 0, 1), Step(1, B, 0, 2))
    assert deps[Step(0, F, 0, 0)] == ()
    assert deps[Step(2, B, 0, 2)] == (Step(2, F, 0, 2),)
    free = pipeline_dependencies([3], stages=3, chained=False)
    assert free[Step(1, F, 0, 1)] == (Step(0, F, 0, 1),)
    assert free[Step(1, B, 0, 1)] == (Step(2, B, 0, 1), Step(1, F, 0, 1))
    assert len(free) == len(deps) == 2 * 3 * 3


def test_sequential_runs_one_step_at_a_time():
    s = build_schedule([2, 1], stages=3, policy="sequential", chained=True)
    r = simulate(s, unit, lambda st: 2.0)
    spans = sorted((r.start[x], r.end[x]) for x in s.steps())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert r.makespan == 3 * 3 * (1.0 + 2.0)
    assert r.bubble_fraction == pytest.approx(1 - 1 / 3)


# ---- invalid orders are rejected --------------------------------------------------------------


def _two_stage(order0, order1, counts=(2,), chained=False):
    return Schedule(2, (order0, order1), pipeline_dependencies(list(counts), 2, chained))


def test_deadlocking_order_is_rejected_naming_the_blocked_steps():
    # Stage 0 wants B0.0 before F0.1; stage 1 runs F0.1 (which needs stage 0's) before B0.0.
    bad = _two_stage(
        (Step(0, F, 0, 0), Step(0, B, 0, 0), Step(0, F, 0, 1), Step(0, B, 0, 1)),
        (Step(1, F, 0, 0), Step(1, F, 0, 1), Step(1, B, 0, 0), Step(1, B, 0, 1)),
    )
    with pytest.raises(ScheduleError, match=r"deadlocks after 2 of 8 steps.*stage 0 position 1: "
                       r"Step\(B s0 h0 m0\) waits for Step\(B s1 h0 m0\).*stage 1 position 1: "
                       r"Step\(F s1 h0 m1\) waits for Step\(F s0 h0 m1\)"):
        bad.validate()
    with pytest.raises(ScheduleError):
        simulate(bad, unit)


def test_chained_backward_in_forward_order_is_rejected():
    row = (Step(0, F, 0, 0), Step(0, F, 0, 1), Step(0, B, 0, 0), Step(0, B, 0, 1))
    s = Schedule(1, (row,), pipeline_dependencies([2], 1, chained=True))
    with pytest.raises(ScheduleError, match=r"Step\(B s0 h0 m0\) waits for Step\(B s0 h0 m1\)"):
        s.validate()
    Schedule(1, (row,), pipeline_dependencies([2], 1, chained=False)).validate()  # fine unchained


@pytest.mark.parametrize(
    "order, deps, message",
    [
        (((Step(1, F, 0, 0), Step(1, B, 0, 0)),), {}, "belongs to stage 1"),
        (((Step(0, F, 0, 0), Step(0, F, 0, 0), Step(0, B, 0, 0)),), {}, "appears twice"),
        (((Step(0, F, 0, 0),),), {}, r"has no Step\(B s0 h0 m0\)"),
        (((Step(0, B, 0, 0), Step(0, F, 0, 0)),), {}, "before its forward"),
        (
            ((Step(0, F, 0, 0), Step(0, B, 0, 0)),),
            {Step(0, F, 0, 0): (Step(0, F, 0, 1),)},
            "which no stage order contains",
        ),
        (
            ((Step(0, F, 0, 0), Step(0, B, 0, 0)),),
            {Step(0, F, 0, 0): (Step(0, F, 0, 0),)},
            "depends on itself",
        ),
    ],
)
def test_malformed_schedules_are_rejected(order, deps, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(1, order, deps).validate()


def test_bad_arguments_raise_schedule_errors():
    with pytest.raises(ScheduleError, match=r"hTask 1 has micro-batch count 0"):
        build_schedule([2, 0], 2, "1f1b")
    with pytest.raises(ScheduleError, match="at least one hTask"):
        build_schedule([], 2, "1f1b")
    with pytest.raises(ScheduleError, match="stages must be an int >= 1"):
        build_schedule([2], 0, "1f1b")
    with pytest.raises(ScheduleError, match=r"policy='zb' is not one of \['1f1b', 'interleaved'"):
        build_schedule([2], 2, "zb")
    with pytest.raises(ScheduleError, match="2 stages but 1 stage orders"):
        Schedule(2, ((),), {})
    with pytest.raises(ScheduleError, match="Step.micro_batch must be an int >= 0"):
        Step(0, F, 0, -1)
    s = build_schedule([1], 1, "1f1b")
    with pytest.raises(ScheduleError, match=r"fwd_time returned -1.0 for Step\(F s0 h0 m0\)"):
        simulate(s, lambda st: -1.0)
    with pytest.raises(ScheduleError, match="comm_time must be >= 0"):
        simulate(s, unit, comm_time=-1)
    assert issubclass(ScheduleError, MuxcError)


# ---- simulator numbers -----------------------------------------------------------------------


def test_one_stage_runs_back_to_back():
    s = build_schedule([3], stages=1, policy="1f1b")
    r = simulate(s, unit, lambda st: 2.0)
    assert r.makespan == 9.0 and r.busy == (9.0,) and r.bubble_fraction == 0.0
    assert r.utilisation == (1.0,)
    assert r.peak_memory == (1.0,)  # B0 ends at 3 exactly when F1 starts: freed first
    chained = simulate(build_schedule([3], 1, "1f1b", chained=True), unit, lambda st: 2.0)
    assert chained.makespan == 9.0 and chained.peak_memory == (3.0,)  # all chunks held


def test_two_stages_one_micro_batch_by_hand():
    s = build_schedule([1], stages=2, policy="1f1b")
    r = simulate(s, unit, lambda st: 2.0)
    assert r.makespan == 2 * 1.0 + 2 * 2.0
    assert [(r.start[x], r.end[x]) for x in s.order[0]] == [(0.0, 1.0), (4.0, 6.0)]
    assert [(r.start[x], r.end[x]) for x in s.order[1]] == [(1.0, 2.0), (2.0, 4.0)]
    assert r.busy == (3.0, 3.0) and r.bubble_fraction == 0.5
    assert r.utilisation == (0.5, 0.5) and r.peak_memory == (1.0, 1.0)
    # two stage-to-stage hops (activation F s0 -> F s1, gradient B s1 -> B s0) pay comm_time
    assert simulate(s, unit, lambda st: 2.0, comm_time=0.5).makespan == 6.0 + 2 * 0.5


def test_activation_memory_is_held_from_forward_to_backward():
    s = build_schedule([2, 2], stages=2, policy="1f1b")
    r = simulate(s, unit, act_bytes=lambda st: 10.0 * (st.htask + 1))
    # stage 0 holds two micro-batches at once, at most h1 m0 + h1 m1 (20 + 20 bytes); stage 1
    # one at a time
    assert r.peak_memory == (40.0, 20.0)
    counts = simulate(s, unit)
    assert counts.peak_memory == (2.0, 1.0)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("f, b", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.5)])
def test_plain_1f1b_matches_the_pipeline_formula(stages, f, b):
    for counts in [(1,), (3,), (8,), (2, 5), (4, 4, 4)]:
        for policy in ("1f1b", "interleaved"):
            s = build_schedule(counts, stages, policy)
            r = simulate(s, lambda st: f, lambda st: b)
            assert r.makespan == pytest.approx((sum(counts) + stages - 1) * (f + b))
            assert r.bubble_fraction == pytest.approx((stages - 1) / (sum(counts) + stages - 1))
            check_simulation(s, r)


def test_formula_agrees_with_the_cost_model():
    iteration = pytest.importorskip("muxc.plan.iteration", reason="muxc.plan not importable")
    for stages, counts in [(4, [4, 4]), (2, [3]), (3, [2, 5, 1])]:
        r = simulate(build_schedule(counts, stages, "1f1b"), unit, lambda st: 2.0)
        assert r.makespan == pytest.approx(
            iteration.pipeline_iteration_time([3.0] * stages, micro_batches=counts)
        )
        assert r.bubble_fraction == pytest.approx(iteration.bubble_fraction(stages, counts))


def test_simulation_respects_order_and_dependencies_everywhere():
    for stages, counts, policy, chained in itertools.product(
        (1, 2, 4), ((1,), (5, 2), (3, 3, 3), (1, 6, 2, 5)), POLICIES, (False, True)
    ):
        s = build_schedule(counts, stages, policy, chained)
        times = time_table([[1.0 + 0.25 * h + 0.5 * st for h in range(len(counts))]
                            for st in range(stages)])
        r = simulate(s, times, lambda st: 1.5 * times(st), comm_time=0.3)
        check_simulation(s, r, comm=0.3)
        assert sum(r.busy) == pytest.approx(2.5 * sum(times(x) for x in s.steps() if x.is_forward))


# ---- interleaving hTasks vs plain 1F1B --------------------------------------------------------


def _bubble(counts, policy, b=1.0, stages=4):
    return simulate(build_schedule(counts, stages, policy, chained=True), unit, lambda st: b)


def test_interleaving_chained_htasks_halves_the_bubble_at_4_stages():
    # 4 hTasks x 4 chunks, f = b = 1: plain 1F1B waits for each new hTask's chunk chain at
    # every hTask boundary ((S-1)·b each); interleaving reaches the 1F1B optimum.
    plain, inter = _bubble((4, 4, 4, 4), "1f1b"), _bubble((4, 4, 4, 4), "interleaved")
    assert plain.makespan == 38.0 + 3 * 3 * 1.0 and inter.makespan == 38.0
    assert plain.bubble_fraction == pytest.approx(15 / 47)  # 0.319
    assert inter.bubble_fraction == pytest.approx(6 / 38)  # 0.158
    assert inter.bubble_fraction <= 0.5 * plain.bubble_fraction  # 0.495x
    # b = 2f: 0.360 -> 0.158 (0.44x)
    assert _bubble((4, 4, 4, 4), "interleaved", b=2.0).bubble_fraction <= 0.45 * _bubble(
        (4, 4, 4, 4), "1f1b", b=2.0).bubble_fraction
    # The price: interleaving holds every chunk's activations at once (GPipe-like) where plain
    # 1F1B holds one hTask's chunks plus its warm-up.
    assert inter.peak_memory == (16.0, 15.0, 14.0, 13.0)
    assert plain.peak_memory == (7.0, 6.0, 5.0, 4.0)


def test_interleaving_two_chained_htasks_is_lower_but_not_half():
    # Honest numbers for 2 hTasks: one boundary only, so the gain is smaller than 2x.
    plain, inter = _bubble((4, 4), "1f1b"), _bubble((4, 4), "interleaved")
    assert plain.bubble_fraction == pytest.approx(9 / 25)  # 0.360
    assert inter.bubble_fraction == pytest.approx(6 / 22)  # 0.273 (0.76x)
    plain, inter = _bubble((8, 8), "1f1b"), _bubble((8, 8), "interleaved")
    assert plain.bubble_fraction == pytest.approx(9 / 41)  # 0.220
    assert inter.bubble_fraction == pytest.approx(6 / 38)  # 0.158 (0.72x)


def test_interleaved_reaches_the_1f1b_optimum_for_any_counts():
    # With uniform step times, interleaving removes the whole cost of chained chunks, also for
    # uneven hTasks and counts below the number of stages; plain 1F1B never beats it.
    for stages in range(1, 5):
        for counts in SHAPES[::3]:
            for b in (1.0, 2.0):
                best = (sum(counts) + stages - 1) * (1.0 + b)
                for chained in (False, True):
                    s = build_schedule(counts, stages, "interleaved", chained)
                    assert simulate(s, unit, lambda st: b).makespan == pytest.approx(best)
                plain = build_schedule(counts, stages, "1f1b", chained=True)
                assert simulate(plain, unit, lambda st: b).makespan >= best - 1e-9


# ---- dumps -----------------------------------------------------------------------------------


def test_reprs_and_tables():
    s = build_schedule([2, 1], stages=2, policy="interleaved", chained=True)
    assert repr(s) == (
        "Schedule(interleaved, 2 stages, 2 hTasks, micro-batches [2, 1], chained, 12 steps)"
    )
    assert s.table().splitlines() == [
        "stage | 0    1    2    3    4    5",
        "    0 | F0.0 F0.1 F1.0 B0.1 B1.0 B0.0",
        "    1 | F0.0 F0.1 B0.1 F1.0 B1.0 B0.0",
    ]
    listing = s.table(deps=True)
    assert "Step(B s0 h0 m0) | Step(B s1 h0 m0), Step(F s0 h0 m0), Step(B s0 h0 m1)" in listing
    r = simulate(s, unit)
    assert repr(r) == (
        "SimResult(makespan 8, bubble 0.25, utilisation [0.75, 0.75], peak memory [3, 2])"
    )
    assert r.table().splitlines() == [
        "makespan 8, bubble fraction 0.250",
        "stage | busy       | utilisation | idle       | peak memory",
        "    0 | 6          | 0.750       | 2          | 3",
        "    1 | 6          | 0.750       | 2          | 2",
    ]


def test_gantt_text_is_fixed_width():
    s = build_schedule([3, 2], stages=3, policy="interleaved", chained=True)
    r = simulate(s, unit, lambda st: 2.0)
    text = gantt_text(s, r, width=60)
    rows = [line for line in text.splitlines() if line.startswith("stage")]
    assert len(rows) == 3 and {len(line) for line in rows} == {len("stage 0 |") + 60 + 1}
    assert "A0" in rows[0] and "b" in rows[2]


def test_gantt_png_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the PNG Gantt chart")
    s = build_schedule([4, 4], stages=4, policy="interleaved", chained=True)
    path = gantt_png(s, simulate(s, unit), tmp_path / "sub" / "gantt.png", title="4x2")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gantt_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    s = build_schedule([1], stages=1, policy="1f1b")
    with pytest.raises(GanttUnavailableError, match="pip install matplotlib"):
        gantt_png(s, simulate(s, unit), tmp_path / "g.png")


# ---- determinism -----------------------------------------------------------------------------


def test_builders_and_simulator_are_deterministic():
    for policy in POLICIES:
        a = build_schedule((5, 2, 3), 4, policy, True)
        b = build_schedule([5, 2, 3], 4, SchedulePolicy(policy), True)
        assert a.order == b.order and dict(a.deps) == dict(b.deps) and a == b
        assert a.table(deps=True) == b.table(deps=True)
        ra, rb = simulate(a, unit, lambda st: 2.0), simulate(b, unit, lambda st: 2.0)
        assert dict(ra.start) == dict(rb.start) and dict(ra.end) == dict(rb.end)
        assert gantt_text(a, ra) == gantt_text(b, rb)


# ---- choosing a policy -----------------------------------------------------------------------


def test_best_schedule_picks_the_fastest_that_fits_memory():
    s, r = best_schedule([4, 4, 4, 4], stages=4, chained=True, fwd_time=unit)
    assert s.policy == "interleaved" and r.makespan == 38.0 and r.peak_memory[0] == 16.0
    s, r = best_schedule([4, 4, 4, 4], 4, True, unit, memory_budget=10.0)
    assert s.policy == "1f1b" and r.makespan == 47.0 and max(r.peak_memory) == 7.0
    # independent micro-batches of unequal hTask sizes: hTask order is the faster one here
    sizes = time_table([[1.0, 2.0, 1.0, 2.0]] * 4)
    s, r = best_schedule([4, 4, 4, 4], 4, False, sizes)
    assert s.policy == "1f1b" and r.makespan == 66.0
    assert simulate(build_schedule([4] * 4, 4, "interleaved"), sizes).makespan == 73.0
    with pytest.raises(ScheduleError, match=r"budget 3 per stage \(peaks: interleaved: 16, 1f1b"):
        best_schedule([4, 4, 4, 4], 4, True, unit, memory_budget=3)
