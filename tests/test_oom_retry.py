"""Out of memory in a fused hTask: the step is retried once with that hTask split, exactly."""

from __future__ import annotations

import pytest
import torch
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.runtime.local import LocalExecutor
from muxc.runtime.oom import is_out_of_memory

CONFIGS = {  # dropout on: the retry must draw the masks the failed attempt drew
    "a": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "b": LoraConfig(r=8, target_modules=["up_proj", "o_proj"], lora_dropout=0.1),
    "c": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}
CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"


@pytest.fixture(scope="module")
def program(llama):
    tasks = [muxc.Task(name=n, model=make_peft(llama, cfg, i + 1)) for i, (n, cfg) in enumerate(CONFIGS.items())]
    return muxc.compile(tasks, muxc.Options(fusion="spatial"))


def _batches(seed: int) -> dict:
    return {n: make_batch(2 + i, 5 + 2 * i, seed + i) for i, n in enumerate(CONFIGS)}


def _params(program) -> list[torch.Tensor]:
    return [p for s in program.states.values() for p in s.params]


def _grads(program) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in _params(program)]


def _set_grads(program, grads) -> None:
    for p, g in zip(_params(program), grads):
        p.grad = None if g is None else g.clone()


def _inject(monkeypatch, error, times: int | None) -> list:
    """Make the backward of micro-batches with several tasks raise ``error()`` after running
    (its gradients are already added: the retry must not count them twice); ``times`` calls."""
    raised = []
    real = LocalExecutor._backward

    def failing(self, mb, stage):
        real(self, mb, stage)
        if len(mb.mux.tasks) > 1 and (times is None or len(raised) < times):
            raised.append([*mb.mux.tasks])
            raise error()

    monkeypatch.setattr(LocalExecutor, "_backward", failing)
    return raised


@pytest.mark.parametrize("error", [lambda: torch.OutOfMemoryError("CUDA out of memory."),
                                   lambda: RuntimeError(CPU_OOM)], ids=["cuda", "cpu"])
def test_oom_in_fused_htask_retries_split_and_equals_the_uninjected_run(program, monkeypatch, error):
    _set_grads(program, [None] * len(_params(program)))
    program.forward_backward(_batches(1))  # gradients accumulated before the failing step
    before = _grads(program)
    assert all(g is not None for g in before)
    raised = _inject(monkeypatch, error, times=1)
    torch.manual_seed(7)
    with pytest.warns(muxc.OutOfMemoryRetryWarning, match=r"hTask \['a', 'b', 'c'\]"):
        losses = program.forward_backward(_batches(2))
    assert raised == [["a", "b", "c"]]
    split = program.last_plan
    # the failing hTask was split: at most half its tasks (rounded up) per hTask, all tasks run
    assert len(split.htasks) >= 2 and all(len(h) <= 2 for h in split.htasks)
    assert sorted(t for h in split.htasks for t in h) == ["a", "b", "c"] and split.fusion is None
    assert all(o.retried.startswith("out of memory in hTask ['a', 'b', 'c']") and not o.skipped
               for o in program.last_step.values())
    got = _grads(program)
    monkeypatch.undo()
    # the un-injected run of that plan from the same gradients and RNG state: bit for bit
    _set_grads(program, before)
    torch.manual_seed(7)
    want = program.executor.run(split, _batches(2))
    assert losses.keys() == want.keys()
    assert all(torch.equal(losses[t], want[t]) for t in want)
    now = _grads(program)
    assert all(torch.equal(g, w) for g, w in zip(got, now))
    assert any(not torch.equal(g, b) for g, b in zip(got, before))  # the step did add gradients
    _set_grads(program, [None] * len(_params(program)))


def test_oom_again_in_the_retry_raises_typed_error_with_state_unchanged(program, monkeypatch):
    _set_grads(program, [None] * len(_params(program)))
    program.forward_backward(_batches(3))
    before = _grads(program)
    adapters = [p.detach().clone() for p in _params(program)]
    steps = {n: s.steps for n, s in program.states.items()}
    raised = _inject(monkeypatch, lambda: RuntimeError(CPU_OOM), times=None)
    with pytest.raises(muxc.StepOutOfMemoryError, match=r"and again when run as hTasks .*"
                       r"adapter gradients are as they were before the step.*fusion='temporal'"):
        program.step(_batches(4))
    assert raised[0] == ["a", "b", "c"] and len(raised) == 2  # first attempt, then the split one
    assert all(torch.equal(g, b) for g, b in zip(_grads(program), before))
    assert all(torch.equal(p, a) for p, a in zip(_params(program), adapters))
    assert {n: s.steps for n, s in program.states.items()} == steps
    _set_grads(program, [None] * len(_params(program)))


def test_oom_with_nothing_to_split_is_not_retried(program, monkeypatch):
    temporal = program.with_options(fusion="temporal")
    _set_grads(program, [None] * len(_params(program)))
    real = LocalExecutor._backward
    calls = []

    def failing(self, mb, stage):
        real(self, mb, stage)
        calls.append(mb.mux.tasks)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(LocalExecutor, "_backward", failing)
    with pytest.raises(muxc.StepOutOfMemoryError, match=r"hTask \['a'\], which runs one task .*not retried"
                       r".*as they were before the step"):
        temporal.forward_backward(_batches(5))
    assert calls == [("a",)]
    assert all(p.grad is None for p in _params(program))  # None before: put back exactly


def test_is_out_of_memory_knows_cpu_and_cuda_allocation_failures():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        torch.empty(10**14, dtype=torch.uint8)  # 100 TB: the CPU allocator refuses
    except RuntimeError as e:
        assert is_out_of_memory(e), str(e)
    else:  # pragma: no cover - a machine that lends 100 TB
        pytest.skip("the allocator granted 100 TB")
    assert not is_out_of_memory(RuntimeError("index out of range in self"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only RuntimeErrors say so


def test_split_keeps_other_htasks_and_chunk_size_with_chunk_alignment(llama, monkeypatch):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    names = ["w", "x", "y", "z"]
    program = muxc.compile([muxc.Task(name=n, model=make_peft(llama, cfg, i + 1)) for i, n in enumerate(names)],
                           muxc.Options(alignment="chunk", chunk_size=4, fusion="spatial"))
    batches = {n: make_batch(2, 6 + i, 20 + i, pad_rows=0) for i, n in enumerate(names)}
    plan = program.plan(batches)
    split = program.planner.split(plan, batches, 0)
    assert plan.htasks == [names] and split.chunk_size == plan.chunk_size == 4
    assert sorted(t for h in split.htasks for t in h) == names and max(map(len, split.htasks)) == 2
    again = program.planner.split(split, batches, None)  # not known where: the biggest fused one
    assert sorted(map(len, again.htasks)) == [1, 1, 2]
    singles = program.with_options(fusion="temporal").plan(batches)
    assert program.planner.split(singles, batches, None) is None  # nothing fused: nothing to split
    raised = _inject(monkeypatch, lambda: torch.OutOfMemoryError("CUDA out of memory."), times=1)
    with pytest.warns(muxc.OutOfMemoryRetryWarning):
        losses = program.forward_backward(batches)
    got = [p.grad.clone() for s in program.states.values() for p in s.params]
    monkeypatch.undo()
    assert raised and program.last_plan.htasks == split.htasks
    for s in program.states.values():
        s.optimizer.zero_grad(set_to_none=True)
    want = program.executor.run(split, batches)
    assert all(torch.equal(losses[t], want[t]) for t in names)
    now = [p.grad for s in program.states.values() for p in s.params]
    assert all(torch.equal(g, w) for g, w in zip(got, now))
