"""Admission: a batch over ``max_task_tokens`` or a step over ``memory_budget`` is refused with
`AdmissionError` before anything runs, naming the task, its tokens and the limit."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import same, training_snapshot
from models import make_batch, make_peft
from peft import LoraConfig

import muxc
from muxc.plan import plan_peak_bytes


@pytest.fixture(scope="module")
def program(llama):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    tasks = [muxc.Task(name=n, model=make_peft(llama, config, s)) for s, n in enumerate("ab", 1)]
    program = muxc.compile(tasks, muxc.Options(fusion="spatial"))
    program.step(_batches())  # optimizer state exists, so "unchanged" covers it
    return program


def _batches():
    return {"a": make_batch(2, 6, 1), "b": make_batch(4, 9, 2)}  # 12 and 36 tokens


@pytest.fixture
def guarded(program, monkeypatch):
    """``program`` whose executor fails the test if it runs; grads exist (forward_backward)."""
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    program.forward_backward(_batches())

    def boom(*a, **k):
        raise AssertionError("the executor ran")

    monkeypatch.setattr(program.executor, "run", boom)
    return program


def _refused(program, call, batches, match, **options):
    p = program.with_options(**options)
    before, last = training_snapshot(p), p.last_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any task is warned about
        with pytest.raises(muxc.AdmissionError, match=match):
            getattr(p, call)(batches)
    assert same(training_snapshot(p), before)
    assert p.last_step is last


@pytest.mark.parametrize("call", ["step", "forward_backward", "evaluate"])
def test_batch_over_max_task_tokens_is_refused(guarded, call):
    want = (r"task 'b': its batch brings 36 tokens \(4 rows x 9\) to this step, over "
            r"Options.max_task_tokens=35; split it .* Nothing was run")
    _refused(guarded, call, _batches(), want, max_task_tokens=35)


def test_refusal_comes_before_empty_batch_warnings(guarded):
    batches = _batches()
    batches["a"]["labels"] = torch.full_like(batches["a"]["labels"], -100)
    _refused(guarded, "step", batches, "task 'b'", max_task_tokens=20)


def test_batches_at_the_limit_run_and_match_no_limit(program):
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    want = program.evaluate(_batches())
    got = program.with_options(max_task_tokens=36).evaluate(_batches())
    assert list(got) == ["a", "b"] and all(torch.equal(got[t], want[t]) for t in want)


def _peaks(program):
    """(a alone, b alone, both fused) predicted peak bytes of `_batches()`."""
    b = _batches()
    solo = program.planner.alone()
    alone = [plan_peak_bytes(program.planner.summary, solo.plan({t: b[t]})) for t in "ab"]
    return (*alone, plan_peak_bytes(program.planner.summary, program.plan(b)))


def test_peaks_are_ordered(program):
    a, b, both = _peaks(program)
    fixed = muxc.plan.estimate_memory(program.planner.summary, {}, seq_len=1).total
    assert fixed < a < b < both  # b has more tokens; spatial holds both tasks' activations


def test_task_over_memory_budget_alone_is_named(guarded):
    _, b, _ = _peaks(guarded)
    want = (r"task 'b': its batch \(36 tokens, 4 rows x 9\) is predicted to need .* MiB even "
            rf"alone, over Options.memory_budget={b - 1} .* Nothing was run")
    _refused(guarded, "step", _batches(), want, memory_budget=b - 1)


def test_fused_step_over_memory_budget_names_the_largest_task(guarded):
    _, b, both = _peaks(guarded)
    assert both > b
    want = (rf"this step's plan \(hTasks \[\['a', 'b'\]\]\) is predicted to need .* over "
            rf"Options.memory_budget={both - 1} .* each task fits alone; the largest is task 'b' "
            rf"with 36 tokens .* use fusion='auto' \(it plans under the budget\) or 'temporal' "
            rf"\(now 'spatial'\)")
    _refused(guarded, "forward_backward", _batches(), want, memory_budget=both - 1)


def test_auto_and_temporal_fit_where_spatial_is_refused(program):
    _, b, both = _peaks(program)
    for fusion in ("auto", "temporal"):
        p = program.with_options(fusion=fusion, memory_budget=both - 1)
        p.forward_backward(_batches())  # one task's activations at a time: b's peak
        assert sorted(p.last_plan.htasks) == [["a"], ["b"]], fusion
        if fusion == "auto":  # the planner's own hTasks: the one holding more activations first
            assert p.last_plan.htasks[0] == ["b"]
        assert plan_peak_bytes(p.planner.summary, p.last_plan) == b
        for st in program.states.values():
            st.optimizer.zero_grad(set_to_none=True)


def test_step_within_memory_budget_runs_and_matches_no_budget(program):
    _, _, both = _peaks(program)
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    want = program.forward_backward(_batches())
    grads = [p.grad.clone() for st in program.states.values() for p in st.params]
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    limited = program.with_options(memory_budget=both, max_task_tokens=36)
    got = limited.forward_backward(_batches())
    assert all(torch.equal(got[t], want[t]) for t in want)
    assert all(torch.equal(p.grad, g) for p, g in
               zip((p for st in program.states.values() for p in st.params), grads))
    assert limited.last_plan is not None and limited.last_plan.htasks == [["a", "b"]]
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "10"])
def test_max_task_tokens_is_validated(value):
    with pytest.raises(muxc.OptionsError, match="max_task_tokens must be a positive int or None"):
        muxc.Options(max_task_tokens=value)


def test_max_task_tokens_is_a_run_time_option(program):
    assert "max_task_tokens" in muxc.api.RUN_TIME_OPTIONS
    assert program.with_options(max_task_tokens=8).options.max_task_tokens == 8
    assert muxc.Options.from_dict({"max_task_tokens": 4}).max_task_tokens == 4
