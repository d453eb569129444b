"""Fusion DP: optimal against brute force; spatial/temporal extremes; limits respected."""

from __future__ import annotations

import random

import pytest

from muxc.errors import OptionsError
from muxc.ir import GroupCost
from muxc.plan.fusion_dp import brute_force, contiguous_partitions, objective, plan_fusion


def _cost_model(loads, sat=256, per_token=1e-6, floor=2e-4, act_per_token=1000.0, mb_tokens=128):
    """Latency flat below saturation, linear above; micro-batches of ``mb_tokens``."""

    def latency(tokens):
        return floor + per_token * max(0, tokens - sat)

    def cost(group):
        tokens = sum(loads[t] for t in group)
        m = max(1, -(-tokens // mb_tokens))
        slot = latency(tokens / m) + 1e-5 * len(group)
        return GroupCost(work=m * slot, slot=slot, activation_bytes=act_per_token * tokens / m, tokens=tokens // m)

    return cost


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_dp_matches_brute_force(seed, stages):
    rng = random.Random(seed)
    loads = {f"t{i}": rng.choice([16, 40, 90, 200, 400, 800]) for i in range(rng.randint(1, 7))}
    cost = _cost_model(loads)
    sat = rng.choice([None, 300, 1000])
    budget = rng.choice([None, 2e5, 5e5])
    if budget is not None and any(cost((t,)).activation_bytes > budget for t in loads):
        with pytest.raises(OptionsError, match="alone needs"):
            plan_fusion(loads, cost, stages, sat, budget)
        return
    plan = plan_fusion(loads, cost, stages, sat, budget)
    groups, best = brute_force(loads, cost, stages, sat, budget)
    assert plan.predicted == pytest.approx(best, rel=1e-12)
    assert objective(plan.htasks, cost, stages) == pytest.approx(best, rel=1e-12)
    assert sorted(t for h in plan.htasks for t in h) == sorted(loads)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("slack", [0.01, 0.05, 0.3])
def test_memory_slack_takes_the_smallest_peak_within_the_slack(seed, slack):
    """Of all groupings within ``slack`` of the fastest (brute force), the plan's largest hTask
    holds the fewest activation bytes; without slack the plan is the fastest."""
    rng = random.Random(seed)
    loads = {f"t{i}": rng.choice([16, 40, 90, 200]) for i in range(rng.randint(2, 6))}
    cost = _cost_model(loads, sat=rng.choice([256, 600]))
    stages = rng.choice([1, 2])
    fastest = plan_fusion(loads, cost, stages)
    plan = plan_fusion(loads, cost, stages, memory_slack=slack)
    order = sorted(loads, key=lambda t: (loads[t], t))
    within = [max(cost(g).activation_bytes for g in groups)
              for groups in contiguous_partitions(order)
              if objective(groups, cost, stages) <= fastest.predicted * (1 + slack)]
    peak = max(cost(h).activation_bytes for h in plan.htasks)
    assert peak == min(within)
    assert plan.predicted <= fastest.predicted * (1 + slack) + 1e-15
    assert peak <= max(cost(h).activation_bytes for h in fastest.htasks)


def test_memory_slack_prefers_unfused_when_fusing_gains_little():
    """Fusing two tasks is 1% faster here and doubles the hTask's activations: with 2% slack
    they run apart."""
    def cost(group):
        return GroupCost(work=1.0 * len(group) - 0.01 * (len(group) - 1), slot=1.0,
                         activation_bytes=100.0 * len(group), tokens=len(group))

    loads = {"a": 10, "b": 10}
    assert plan_fusion(loads, cost).htasks == (("a", "b"),)
    assert plan_fusion(loads, cost, memory_slack=0.02).htasks == (("a",), ("b",))
    assert plan_fusion(loads, cost, memory_slack=0.001).htasks == (("a", "b"),)


def test_small_tasks_fuse_and_saturation_stops_growth():
    loads = {"a": 20, "b": 30, "c": 40, "d": 5000}
    plan = plan_fusion(loads, _cost_model(loads), stages=1, saturation_tokens=1000)
    assert ("a", "b", "c") in plan.htasks and ("d",) in plan.htasks
    assert plan.alternatives["auto"] <= min(plan.alternatives["spatial"], plan.alternatives["temporal"])


def test_single_task_over_budget_raises():
    loads = {"a": 100}
    with pytest.raises(OptionsError, match="task 'a' alone needs .* raise memory_budget"):
        plan_fusion(loads, _cost_model(loads), activation_budget=10.0)


def test_deterministic():
    loads = {f"t{i}": 64 for i in range(6)}
    cost = _cost_model(loads)
    assert plan_fusion(loads, cost, 4).htasks == plan_fusion(dict(reversed(loads.items())), cost, 4).htasks


def test_alternatives_past_saturation_are_marked():
    loads = {"a": 600, "b": 700}
    plan = plan_fusion(loads, _cost_model(loads, mb_tokens=10_000), stages=1, saturation_tokens=1000)
    assert plan.htasks == (("a",), ("b",))
    assert plan.infeasible == ("spatial",)
    assert "spatial=" in str(plan) and "(not allowed)" in str(plan)


def test_shown_cost_prices_only_the_spatial_alternative_the_dp_may_not_pick():
    """The all-tasks alternative is priced by ``shown_cost`` only where the DP may not pick it
    (past saturation); where it is a candidate, by ``cost`` like every plan the DP compares."""
    loads = {"a": 600, "b": 700}
    cost = _cost_model(loads, mb_tokens=10_000)
    shown = lambda g: GroupCost(work=99.0, slot=99.0, activation_bytes=0, tokens=1)  # noqa: E731
    past = plan_fusion(loads, cost, saturation_tokens=1000, shown_cost=shown)
    assert past.alternatives["spatial"] == 99.0 and past.infeasible == ("spatial",)
    assert past.alternatives["temporal"] == objective([("a",), ("b",)], cost, 1)
    free = plan_fusion(loads, cost, saturation_tokens=None, shown_cost=shown)
    assert free.alternatives["spatial"] == objective([("a", "b")], cost, 1)
