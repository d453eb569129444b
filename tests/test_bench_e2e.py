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


def _row(system, tasks, *, part="main", workload="nonuniform", model="m", tok_s=100.0,
         step_ms=100.0, computed=1000.0, effective=800.0, peak=100.0, **extra):
    return {"model": model, "workload": workload, "tasks": tasks, "system": system,
            "part": part, "effective_tok_s": tok_s, "step_ms": step_ms,
            "computed_tokens_per_step": computed, "effective_tokens_per_step": effective,
            "ineffective_fraction": 1 - effective / computed, "peak_mem_mib": peak,
            "options": f"opts of {system}", "clock": "cpu", "plan": "", **extra}


def test_headline_computes_the_issue9_keys_from_rows():
    rows = [
        _row("hf-separate", 8, tok_s=100.0, step_ms=200.0, computed=1250.0, effective=1000.0,
             peak=400.0),
        _row("hf-multi-adapter", 8, tok_s=90.0, peak=300.0),
        _row("spatial", 8, tok_s=60.0),
        _row("temporal", 8, tok_s=105.0),
        _row("muxc", 8, tok_s=110.0, step_ms=220.0, computed=1100.0, effective=1000.0,
             peak=200.0),
        _row("temporal-chunk32", 8, part="sweep", tok_s=125.0),
        _row("spatial-chunk32", 8, part="sweep", tok_s=50.0),
        _row("hf-separate", 8, workload="uniform", tok_s=100.0),
        _row("muxc", 8, workload="uniform", tok_s=97.0),
        _row("hf-separate", 8, part="memory-large", model="big", peak=4000.0),
        _row("hf-multi-adapter", 8, part="memory-large", model="big", peak=1000.0),
        _row("muxc", 8, part="memory-large", model="big", peak=800.0),
        _row("muxc", 1, part="compile", model="tiny", compile_s=9.0, compile_cpu_s=2.0),
        _row("muxc", 16, part="compile", model="tiny", compile_s=30.0, compile_cpu_s=5.0),
    ]
    s = report.headline(rows, "cpu", tasks=8)
    # the keys the quick JSON had before stay
    assert s["effective_throughput_ratio_vs_hf_peft"] == 1.1
    assert s["memory_ratio_vs_separate"] == 2.0
    assert set(s["effective_throughput_ratio_vs"]) == {"hf-separate", "hf-multi-adapter",
                                                        "spatial", "temporal"}  # no sweep rows
    # us per computed token: 200 ms / 1250 = 160 us vs 220 ms / 1100 = 200 us
    assert s["us_per_token_ratio_vs_hf_peft"] == 1.25
    assert s["padding_ceiling"] == 1.25  # hf-separate computes 1250 tokens for 1000 real ones
    assert s["auto_vs_best_fixed"] == round(110 / 125, 3)
    assert s["best_fixed"] == "temporal-chunk32"
    assert s["fixed_configs"] == ["spatial", "spatial-chunk32", "temporal", "temporal-chunk32"]
    assert s["effective_throughput_ratio_vs_hf_peft_uniform"] == 0.97
    assert s["memory_ratio_vs_separate_large"] == 5.0
    assert s["memory_large_muxc_vs_multi_adapter"] == 0.8
    assert s["compile_s_ratio_16_vs_1"] == 2.5  # CPU seconds on a cpu-clock run
    assert s["gpu_run"] is False
    met = s["targets_met"]
    assert met["memory_large_muxc_vs_multi_adapter<=1"] is True
    assert met["memory_ratio_vs_separate_large>=6"] is False
    assert met["us_per_token_ratio_vs_hf_peft<=1.05"] is False
    targets = {t["target"]: t for t in report.target_rows(s)}
    assert targets["`compile_s_ratio_16_vs_1` <= 2"]["missed by"] == "over by 0.5 (must fall 20%)"
    assert targets["`memory_ratio_vs_separate_large` >= 6"]["missed by"] == \
        "short by 1 (1.20x to go)"
    notes = " ".join(report.notes(rows, s, [], "cpu", {"m": 10.0, "big": 400.0}))
    assert "MISSED (short by 1 (1.20x to go))" in notes  # the memory target says by how much


def test_headline_without_parts_leaves_their_keys_none():
    s = report.headline([_row("hf-separate", 2), _row("muxc", 2)], "cuda", tasks=8)
    assert s["tasks"] == 2 and s["gpu_run"] is True
    for key in ("auto_vs_best_fixed", "memory_ratio_vs_separate_large",
                "compile_s_ratio_16_vs_1", "effective_throughput_ratio_vs_hf_peft_uniform"):
        assert s[key] is None and s["targets_met"][next(
            t.label for t in report.TARGETS if t.key == key)] is None


def test_quick_cases_have_every_part():
    from bench import e2e

    args = e2e._parse(["--quick"])
    args.rows, args.steps = 4, 3
    cases = e2e._cases(args, torch.device("cpu"))
    by_part = {}
    for c in cases:
        by_part.setdefault(c.get("part", "main"), []).append(c)
    assert {c["system"] for c in by_part["sweep"]} == set(systems.fixed_systems((32, 64)))
    assert {c["tasks"] for c in by_part["sweep"]} == {8}
    assert [(c["tasks"], c["system"]) for c in by_part["memory-large"]] == \
        [(8, "hf-separate"), (8, "hf-multi-adapter"), (8, "muxc")]
    assert all(c["strict_malloc"] and c["steps"] == 1 and c["model"] == "llama-large"
               for c in by_part["memory-large"])
    # steady state: one warm-up step (optimizer state allocated) before the measured one
    assert all(c["warmup"] == 1 and c["steady_peak"] for c in by_part["memory-large"])
    assert sorted(c["tasks"] for c in by_part["compile"]) == [1, 16]
    assert e2e._parse(["--memory-large"]).parts == ("memory-large",)
    # sweep cases run side by side with the main systems of the same tasks, compile ones alone
    decide = e2e._side_by_side(torch.device("cpu"))
    assert decide(by_part["main"][:5] + by_part["sweep"]) is True
    assert decide(by_part["compile"][:1]) is False and decide(by_part["memory-large"]) is False


def test_fixed_system_options():
    options, text = systems.muxc_options("spatial-chunk16")
    assert options.fusion.value == "spatial" and options.alignment.value == "chunk"
    assert options.chunk_size == 16 and "chunk_size=16" in text


def test_only_muxc_full_plans_with_the_cost_profile(tmp_path):
    from bench import e2e

    path = str(tmp_path / "cost-profile-cpu.json")
    assert systems.muxc_options("muxc", path)[0].cost_model == path
    assert systems.muxc_options("temporal-chunk64", path)[0].cost_model is None
    args = e2e._parse(["--quick", "--out", str(tmp_path)])
    cases = e2e._cases(args, torch.device("cpu"))
    assert {c["cost_model"] for c in cases if c.get("part") != "compile"} == {path}
    assert {c["cost_model"] for c in cases if c.get("part") == "compile"} == {""}
    none = e2e._cases(e2e._parse(["--quick", "--cost-model", "none"]), torch.device("cpu"))
    assert {c["cost_model"] for c in none} == {""}
