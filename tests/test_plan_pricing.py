"""`StepPricer` (the planner's fast step pricing) against `estimate_step`, and the planner's
memoisation: same lengths, same plan; other lengths, a new one."""

from __future__ import annotations

import random

import pytest
import torch
from models import lengths_batch, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.plan import (
    CostModel, CostModelError, Roofline, StepShape, estimate_memory, estimate_step,
)
from muxc.plan import summarize_graph
from muxc.plan.pricing import StepPricer


@pytest.fixture(scope="module")
def program(llama):
    """LoRA (two ranks, different targets) and IA3 on one tiny Llama, chunk-aligned."""
    configs = [LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
               LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0),
               IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])]
    tasks = [muxc.Task(name=f"t{i}", model=make_peft(llama, c, i + 1))
             for i, c in enumerate(configs)]
    return muxc.compile(tasks, muxc.Options(fusion="auto", alignment="chunk"))


@pytest.mark.parametrize("overhead, run, site_task", [
    (0.0, 0.0, (0.0, 0.0)), (2e-5, 5e-5, (0.0, 0.0)), (2e-5, 7e-5, (4e-5, 9e-5))])
def test_pricer_equals_estimate_step(program, overhead, run, site_task):
    """Random shapes (fractional rows, some tasks idle, kept K/V, micro-batches), with and
    without per-call, per-run and per-extra-task costs: the same forward and backward seconds
    as `estimate_step`, to rounding."""
    summary = summarize_graph(program.mux)
    cost = CostModel(roofline=Roofline(1e11, 2e10, 3e-6), call_overhead=overhead,
                     run_overhead=run, site_task=site_task)
    pricer = StepPricer(summary, cost)
    rng = random.Random(0)
    for _ in range(300):
        rows = {t: rng.choice([0, 0, 1, 2, 3, 1.5, 7 / 3]) for t in summary.tasks}
        seq = rng.choice([1, 8, 16, 33, 64])
        kv = rng.choice([None, seq, seq * 3, seq * 2 + 5])
        m = rng.choice([1, 1, 2, 5])
        shape = StepShape(rows, seq, kv)
        want = estimate_step(summary, shape, cost=cost, micro_batches=m)
        for _ in range(2):  # priced, then memoised
            fwd, bwd = pricer(shape, m)
            assert fwd == pytest.approx(want.forward, rel=1e-12, abs=1e-15)
            assert bwd == pytest.approx(want.backward, rel=1e-12, abs=1e-15)
            assert pricer.activation_bytes(shape) == estimate_memory(summary, shape).activations
    assert pricer(StepShape({}, 8), 1) == (0.0, 0.0)
    with pytest.raises(CostModelError, match="not in the summary"):
        pricer(StepShape({"nope": 1}, 8), 1)


def test_auto_fusion_prices_with_the_pricer(program):
    """An hTask's price is the sum of `estimate_step` over its chunk runs."""
    from muxc.plan.fusion import chunk_runs, sample_lengths

    fusion = program.planner.fusion
    batches = {f"t{i}": make_batch(3, 20 + 9 * i, i) for i in range(3)}
    lengths = sample_lengths(batches)
    runs = chunk_runs(lengths, 16)
    want = sum(estimate_step(fusion.summary, run, cost=fusion.cost, micro_batches=n).total
               for run, n in runs)
    got = sum(sum(fusion.pricer(run, n)) for run, n in runs)
    assert got == pytest.approx(want, rel=1e-12)


def test_plans_are_memoised_on_the_lengths(program):
    """Batches with the same per-task sample lengths (other tokens) reuse the plan's choices
    (the same cost and schedule objects) with their own tokens laid out; other lengths are
    planned again; a planner without the memo makes the same plan."""
    planner = program.planner.with_options(program.options)
    a = {f"t{i}": make_batch(3, 24, i) for i in range(3)}
    same = {t: {k: v.clone() for k, v in b.items()} for t, b in a.items()}
    same["t0"]["input_ids"] = (same["t0"]["input_ids"] + 1) % 50 + 3  # other tokens
    other = {f"t{i}": make_batch(3, 40, i) for i in range(3)}
    first = planner.plan(a)
    again = planner.plan(same)
    assert again.costs is first.costs and again.schedule is first.schedule
    assert again.htasks == first.htasks and again.chunk_sizes == first.chunk_sizes
    t0 = next(i for i, h in enumerate(first.htask_plans) if "t0" in h.tasks)
    ids = [h.htask_plans[t0].layout.steps[0].ids for h in (first, again)]
    assert ids[0].shape == ids[1].shape and not torch.equal(ids[0], ids[1])
    new = planner.plan(other)
    assert new.costs is not first.costs and new.tokens_computed != first.tokens_computed
    fresh = program.planner.with_options(program.options)  # no memo: the same plan
    for batches, plan in ((same, again), (other, new)):
        made = fresh.plan(batches)
        assert made.htasks == plan.htasks and made.chunk_sizes == plan.chunk_sizes
        assert made.costs == plan.costs and made.tokens_computed == plan.tokens_computed
        for h, g in zip(made.htask_plans, plan.htask_plans):
            for x, y in zip(h.layout.steps, g.layout.steps):
                assert torch.equal(x.ids, y.ids) and torch.equal(x.mask, y.mask)


@pytest.mark.parametrize("call, run", [(1e-3, 1e-3), (2e-5, 5e-5), (0.0, 0.0)])
@pytest.mark.parametrize("lengths", [
    ((5, 9, 4), (60, 31), (12, 20, 7)),  # one long task: its own chunk is not the step's
    ((16, 16), (17, 3), (40, 33, 2)),
])
def test_fusion_dp_prices_the_plan_it_runs(program, call, run, lengths):
    """The fusion DP prices every candidate hTask at the chunk size the plan then runs it at
    (its own, `group_chunks`), and of the groupings within `MEMORY_SLACK` of the fastest it
    takes the one whose largest hTask holds the fewest activations (all its chunk steps'):
    checked against every grouping laid out and priced as the executor runs it, with the
    activations summed per chunk step from `estimate_memory`."""
    from muxc.ir.chunks import build_layout
    from muxc.plan.fusion import MEMORY_SLACK, AutoFusion, loads_of
    from muxc.plan.fusion_dp import contiguous_partitions
    from muxc.plan.step import plan_step

    planner = program.planner.with_options(program.options)
    cost = CostModel(roofline=Roofline(1e11, 2e10, 3e-6), call_overhead=call, run_overhead=run)
    planner._fusion = fusion = AutoFusion(program.mux, program.options, cost, planner.summary)
    batches = {f"t{i}": lengths_batch(v, i) for i, v in enumerate(lengths)}
    chunk = planner.chunk_size(batches)
    loads = loads_of(batches)
    order = sorted(loads, key=lambda t: (loads[t][0], t))
    assert fusion.saturation(chunk) > sum(v[0] for v in loads.values())  # every group allowed

    def run_of(groups):  # (seconds, largest hTask's activations) of the plan the executor runs
        plan = plan_step(planner, batches, tuple(groups), chunk,
                         fusion.group_chunks(batches, groups, chunk))
        held = []
        for h in plan.htask_plans:
            layout = build_layout(batches, h.tasks, h.layout.chunk_size, planner.device)
            held.append(sum(estimate_memory(planner.summary, StepShape(
                dict(zip(s.tasks, s.rows)), layout.chunk_size)).activations
                for s in layout.steps))
        return sum(c.micro_batches * (c.forward + c.backward) for c in plan.costs), max(held)

    every = {tuple(g): run_of(g) for g in contiguous_partitions(order)}
    fastest = min(t for t, _ in every.values())
    least = min(m for t, m in every.values() if t <= fastest * (1 + MEMORY_SLACK))
    chosen = fusion.plan(batches, chunk)
    seconds, held = every[tuple(chosen.htasks)]
    assert chosen.predicted == pytest.approx(seconds, rel=1e-9)  # it priced what runs
    assert chosen.alternatives["temporal"] == pytest.approx(every[tuple((t,) for t in order)][0],
                                                            rel=1e-9)
    assert seconds <= fastest * (1 + MEMORY_SLACK) * (1 + 1e-12)
    assert held == pytest.approx(least, rel=1e-9)
    made = planner.plan(batches)  # the step's plan runs the DP's groups at those chunk sizes
    assert sorted(map(sorted, made.htasks)) == sorted(map(sorted, chosen.htasks))


@pytest.mark.parametrize("flops, call, run, lengths, fewer", [
    (1e9, 0.0, 0.0, ((130,), (120,)), True),  # 9 chunk steps priced fastest, 1 step within 3%
    (1e9, 0.0, 0.0, ((250, 120), (200,)), True),  # 16 steps fastest, 8 within 1%
    (1e11, 2e-5, 5e-5, ((250, 120), (200,)), False),
    (1e11, 1e-3, 1e-3, ((60, 31, 44), (12, 20, 7)), False),
])
def test_group_chunks_prefer_fewer_chunk_steps_within_the_slack(program, flops, call, run, lengths,
                                                                fewer):
    """Each hTask's chunk size: of the candidates priced within `CHUNK_STEP_SLACK` of its
    fastest (on its exact packing), the one with the fewest chunk steps, then the fastest;
    checked against every candidate priced the same way. ``fewer``: the case where that is
    not the fastest prediction."""
    from muxc.ir.chunks import stream_chunks
    from muxc.plan.fusion import CHUNK_STEP_SLACK, AutoFusion, chunk_runs, sample_lengths

    planner = program.planner.with_options(program.options)
    bandwidth = 2e10 if flops > 1e10 else 2e11  # the slow-FLOPs cases: attention dominates
    cost = CostModel(roofline=Roofline(flops, bandwidth, 3e-6), call_overhead=call, run_overhead=run)
    fusion = AutoFusion(program.mux, program.options, cost, planner.summary)
    batches = {"t0": lengths_batch(lengths[0], 0), "t1": lengths_batch(lengths[1], 1)}
    mine = sample_lengths(batches)
    (chosen,) = fusion.group_chunks(batches, [("t0", "t1")], 16)
    longest = max(max(v) for v in lengths)
    candidates = {16, longest} | {1 << k for k in range(4, longest.bit_length() + 1)}

    def priced(c):
        return sum(sum(fusion.pricer(r, n)) for r, n in chunk_runs(mine, c))

    def steps(c):
        return max(s[0] for v in mine.values() for s in [stream_chunks(v, c)])

    fastest = min(candidates, key=priced)
    near = [c for c in candidates if priced(c) <= priced(fastest) * (1 + CHUNK_STEP_SLACK)]
    assert steps(chosen) == min(steps(c) for c in near)
    assert priced(chosen) == pytest.approx(min(priced(c) for c in near if steps(c) == steps(chosen)),
                                           rel=1e-9)
    assert (steps(chosen) < steps(fastest)) is fewer
