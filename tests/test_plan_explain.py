"""explain(batches) reports the step plan: hTasks, stages, chunks, padding, bubbles, time."""

from __future__ import annotations

import pytest
import torch
from helpers import separate
from models import make_peft
from peft import LoraConfig

from muxc.workloads import LENGTHS, Rule, SyntheticTask, sample_batch


@pytest.fixture(scope="module")
def workload(bases):
    """Three LoRA tasks with SST-2, OpenBookQA and RTE-like lengths (very uneven), compiled
    once per alignment with 3 pipeline stages; fusion and chunk size vary per test."""
    base = bases("llama")
    g = torch.Generator().manual_seed(0)
    specs = [SyntheticTask("sst2", Rule(1, 1), LENGTHS["sst2"]), SyntheticTask("obqa", Rule(1, 2), LENGTHS["obqa"]),
             SyntheticTask("rte", Rule(1, 3), LENGTHS["rte"])]
    batches = {s.name: sample_batch(s, 2, 96, g) for s in specs}
    return {alignment: separate(_models(base), batches, alignment=alignment, stages=3)
            for alignment in ("pad", "chunk")}


def _models(base):
    return [(n, make_peft(base, LoraConfig(r=r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), i))
            for i, (n, r) in enumerate([("sst2", 4), ("obqa", 8), ("rte", 16)])]


def test_explain_reports_the_plan(workload, tmp_path):
    case = workload["chunk"]
    batches = case.batches
    program = case.program.with_options(fusion="auto", chunk_size=32)
    rep = program.explain(batches)
    assert sorted(t for h in rep.htasks for t in h) == ["obqa", "rte", "sst2"]
    assert rep.stages == 3 and rep.chunk_size == 32
    assert 0 <= rep.ineffective_token_fraction < 0.2
    assert 0 < rep.bubble_fraction < 1
    assert rep.predicted_step_ms > 0
    alts = rep.plan.fusion.alternatives
    assert alts["auto"] <= min(alts["spatial"], alts["temporal"]) + 1e-12
    text = str(rep)
    for key in ("ineffective_token_fraction", "bubble_fraction", "predicted_step_ms", "fusion DP predicted ms"):
        assert key in text
    paths = program.dump(tmp_path, batches)
    names = {p.name for p in paths}
    assert {"schedule.txt", "schedule_gantt.png", "explain.txt"} <= names
    assert (tmp_path / "schedule_gantt.png").stat().st_size > 1000
    assert "stage 2" in (tmp_path / "schedule.txt").read_text()


def test_pad_vs_chunk_padding_on_nonuniform_lengths(workload):
    batches = workload["pad"].batches
    pad = workload["pad"].program.with_options(fusion="spatial").explain(batches)
    chunk = workload["chunk"].program.with_options(fusion="spatial", chunk_size=16).explain(batches)
    assert pad.ineffective_token_fraction > 0.3
    assert chunk.ineffective_token_fraction < 0.1
    real = sum(int(b["attention_mask"].sum()) for b in batches.values())
    assert chunk.padding["real tokens"] == pad.padding["real tokens"] == real


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_auto_fusion_with_stages_equals_isolated(workload, alignment):
    workload[alignment].check(fusion="auto")
