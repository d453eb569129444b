"""Smoke test of `bench.e2e`'s harness logic: data, memory fit, headline, a tiny run."""

from __future__ import annotations

import torch

from bench import e2e_report as report
from bench import e2e_systems as systems
from bench.e2e import _context, plan, run_group


def test_plan_covers_every_system_and_quick_has_the_headline_case():
    cases = plan(quick=True, device="cpu")
    assert {c[3] for c in cases} == set(systems.SYSTEMS)
    assert ("llama-cpu", "nonuniform", 8, "muxc") in cases
    assert ("llama-cpu", "nonuniform", 8, "hf-separate") in cases


def test_batches_of_a_task_do_not_depend_on_the_task_count():
    few = systems.make_batches(systems.workload_tasks("nonuniform", 2, "llama"), 2, 3, 64, 0)
    many = systems.make_batches(systems.workload_tasks("nonuniform", 5, "llama"), 2, 3, 64, 0)
    for name, batch in few[1].items():
        assert torch.equal(batch["input_ids"], many[1][name]["input_ids"])
    lengths = [b["input_ids"].shape[1] for b in many[0].values()]
    assert len(set(lengths)) > 1  # non-uniform really is


def test_memory_fit_and_tasks_within_budget():
    assert report.fit_line([(1, 110.0), (2, 120.0), (4, 140.0)]) == (100.0, 10.0)
    assert report.tasks_within_budget(100.0, 10.0, budget=185.0) == 8
    assert report.tasks_within_budget(100.0, 10.0, budget=90.0) == 0
    rows = [
        {"model": "m", "workload": "nonuniform", "system": s, "tasks": n, "peak_mem_mib": mem}
        for s, per_task, base in (("hf-separate", 50.0, 20.0), ("muxc", 5.0, 60.0))
        for n in (2, 8)
        for mem in (base + per_task * n,)
    ]
    fits = {r["system"]: r for r in report.budget_rows(rows)}
    assert fits["hf-separate"]["budget_mib"] == 420.0  # its own 8-task peak
    assert fits["hf-separate"]["tasks_fit"] == 8
    assert fits["muxc"]["tasks_fit"] == 72  # (420 - 60) / 5


def test_tiny_two_task_run_and_headline():
    # as the benchmark runs them: one fresh process per system (peak RSS minus the process's
    # idle RSS is only meaningful there), side by side, taking turns step by step
    cases = [dict(model="llama-tiny", workload="nonuniform", tasks=2, system=system, rows=2,
                  steps=1, warmup=0, threads=1)
             for system in ("hf-separate", "temporal", "muxc")]
    rows = run_group(_context(), cases)
    assert [r["status"] for r in rows] == ["ok"] * 3
    effective = {r["effective_tokens_per_step"] for r in rows}
    assert len(effective) == 1  # same data for every system
    for r in rows:
        assert r["computed_tokens_per_step"] >= r["effective_tokens_per_step"] > 0
        assert r["step_ms"] > 0 and r["effective_tok_s"] > 0 and r["peak_mem_mib"] > 0
    by = {r["system"]: r for r in rows}
    assert by["temporal"]["ineffective_fraction"] == by["hf-separate"]["ineffective_fraction"]
    assert "fusion=auto" in by["muxc"]["options"]
    summary = report.headline(rows, "cpu", tasks=8)
    assert summary["tasks"] == 2
    ratio = by["hf-separate"]["peak_mem_mib"] / by["muxc"]["peak_mem_mib"]
    assert summary["memory_ratio_vs_separate"] == round(ratio, 3)
    assert set(summary["effective_throughput_ratio_vs"]) == {"hf-separate", "temporal"}
