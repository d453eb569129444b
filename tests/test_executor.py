"""The executor runs the StepPlan it is handed: the actions it executes are the plan's, per
stage, in the plan's order — and the result stays exact (pipeline stages, chunk steps and pad
micro-batches cross explicit boundaries whose gradients are sent back)."""

from __future__ import annotations

import pytest
from helpers import adapter_grads, assert_matches, isolated
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

CASES = [  # (alignment, stages, fusion, micro_batches, chunk_size)
    ("chunk", 2, "auto", None, 4),
    pytest.param("chunk", 1, "temporal", None, 8, marks=pytest.mark.slow),  # chunk: the cell above
    ("pad", 2, "temporal", 2, None),
    pytest.param("pad", 1, "spatial", 3, None, marks=pytest.mark.slow),  # pad: 2-stage cell above
]


@pytest.fixture(scope="module")
def tasks_and_refs(llama):
    spec = [
        ("r4", make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1)),
        ("r8", make_peft(llama, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(llama, IA3Config(), 3)),
    ]
    batches = {"r4": make_batch(3, 9, 1, pad_rows=2), "r8": make_batch(2, 13, 2), "ia3": make_batch(4, 5, 3)}
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    return spec, batches, refs


@pytest.mark.parametrize("alignment,stages,fusion,micro_batches,chunk_size", CASES)
def test_executed_actions_are_the_plan(tasks_and_refs, alignment, stages, fusion, micro_batches, chunk_size):
    spec, batches, refs = tasks_and_refs
    tasks = [muxc.Task(name=n, model=m) for n, m in spec]
    options = muxc.Options(alignment=alignment, stages=stages, fusion=fusion,
                           micro_batches=micro_batches, chunk_size=chunk_size)
    program = muxc.compile(tasks, options)
    report = program.explain(batches)
    plan = report.plan
    assert plan is not None and plan.stages == stages
    assert str(plan.htasks) in str(report)
    losses = program.forward_backward(batches)
    executed = program.executor.executed
    for s in range(stages):
        assert [a for a in executed if a.stage == s] == list(plan.actions(s)), f"stage {s}"
    assert len(executed) == plan.schedule.num_steps
    assert program.last_plan.schedule.order == plan.schedule.order
    if alignment == "pad" and micro_batches:
        assert max(h.micro_batches for h in plan.htask_plans) == micro_batches
    if alignment == "chunk":
        assert all(h.micro_batches == len(h.layout.steps) for h in plan.htask_plans)
        assert max(h.micro_batches for h in plan.htask_plans) > 1
    measured = program.measured
    assert set(measured.start) == set(executed) and measured.makespan > 0
    assert all(measured.end[a] >= measured.start[a] for a in executed)
    text = str(program.explain())
    assert "simulated vs measured per stage" in text and plan.schedule.policy in text
    models = dict(spec)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)
    for m in models.values():
        m.zero_grad(set_to_none=True)



def test_chunk_step_keeps_no_kv_after_its_backward(tasks_and_refs, monkeypatch):
    """The K/V a chunk step hands to later chunks (stand-ins and their gradients) are freed
    once the hTask's backward ran, not held to the end of the step; the losses stay exact."""
    import gc
    import weakref

    from helpers import rel_err

    from muxc.runtime.local import LocalExecutor

    spec, batches, refs = tasks_and_refs
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(alignment="chunk", fusion="temporal", chunk_size=4))
    kept: dict[int, list[weakref.ref]] = {}  # per hTask (its shared K/V dict): the stand-ins
    alive_after: list[int] = []
    cut_kv, backward = LocalExecutor._cut_kept_kv, LocalExecutor._backward

    def spy_cut(mb, before, cut):
        cut_kv(mb, before, cut)
        kept.setdefault(id(mb.mux.kv), []).extend(weakref.ref(leaf) for _, leaf in cut.pairs)

    def spy_backward(self, mb, stage):
        backward(self, mb, stage)
        if mb.mux.chunk is not None and mb.mux.chunk.index == 0:  # the hTask's last backward
            gc.collect()
            alive_after.append(sum(r() is not None for r in kept.get(id(mb.mux.kv), [])))

    monkeypatch.setattr(LocalExecutor, "_cut_kept_kv", staticmethod(spy_cut))
    monkeypatch.setattr(LocalExecutor, "_backward", spy_backward)
    losses = program.forward_backward(batches)
    assert sum(map(len, kept.values())) > 0, "no chunk step kept K/V for a later one"
    assert alive_after and all(n == 0 for n in alive_after), alive_after
    for name, _ in spec:
        assert rel_err(losses[name], refs[name][0]) < 1e-5, name
