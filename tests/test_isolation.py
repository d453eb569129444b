"""Cross-tenant isolation in every fusion x alignment mode: what one task brings to a step (its
tokens, its batch shape, a NaN/inf adapter) never changes another task's loss or gradients.

Same shapes: bit-identical. Other shapes (the fused layout, hence GEMM shapes and summation
order, changes): within 1e-6. One program is compiled per alignment; fusion modes reuse it
through `Program.with_options`."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import same, training_snapshot
from models import VOCAB, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

FUSIONS = ("spatial", "temporal", "auto")
OTHERS = {"b": "ac", "c": "ab"}  # the task that changes -> the tasks that must not


@pytest.fixture(scope="module", params=["pad", "chunk"])
def compiled(request, llama):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    models = {"a": make_peft(llama, lora, 1), "b": make_peft(llama, lora, 2),
              "c": make_peft(llama, ia3, 3)}
    options = {"chunk_size": 4} if request.param == "chunk" else {}
    tasks = [muxc.Task(name=n, model=m) for n, m in models.items()]
    return muxc.compile(tasks, muxc.Options(alignment=request.param, **options))


def _batches():
    return {"a": make_batch(2, 6, 1), "b": make_batch(3, 5, 2), "c": make_batch(2, 7, 3)}


def _run(program, batches):
    """(losses, {task: [grads]}) of one forward_backward, grads cleared before and after."""
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    losses = program.forward_backward(batches)
    grads = {n: [None if p.grad is None else p.grad.clone() for p in st.params]
             for n, st in program.states.items()}
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _assert_untouched(want, got, names, exact):
    (l0, g0), (l1, g1) = want, got
    for n in names:
        assert all(g is not None for g in g0[n]), f"task {n}: no grads; test is vacuous"
        if exact:
            assert torch.equal(l1[n], l0[n]), f"task {n}: loss {l1[n].item()} vs {l0[n].item()}"
            assert same(g1[n], g0[n]), f"task {n}: grads changed"
        else:
            torch.testing.assert_close(l1[n], l0[n], rtol=0, atol=1e-6)
            for x, y in zip(g1[n], g0[n]):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _new_tokens(batch, seed):
    """Same shape and mask, other token ids (and labels) on the real positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, batch["input_ids"].shape, generator=g)
    mask = batch["attention_mask"]
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("changed", ["b", "c"])
def test_other_tokens_same_shape_leave_others_bit_identical(compiled, fusion, changed):
    program = compiled.with_options(fusion=fusion)
    batches = _batches()
    want = _run(program, batches)
    batches[changed] = _new_tokens(batches[changed], 99)
    got = _run(program, batches)
    assert not torch.equal(got[0][changed], want[0][changed])  # it really changed
    _assert_untouched(want, got, OTHERS[changed], exact=True)


SHAPES = {"more rows": (6, 5), "longer": (3, 12), "one token pair": (1, 2)}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_other_batch_shape_leaves_others_within_1e6(compiled, fusion, shape):
    program = compiled.with_options(fusion=fusion)
    batches = _batches()
    want = _run(program, batches)
    batches["b"] = make_batch(*SHAPES[shape], seed=7, pad_rows=0)
    got = _run(program, batches)
    exact = fusion == "temporal" and program.options.alignment.value == "pad"
    _assert_untouched(want, got, "ac", exact=exact)


def _poison(program, task, value):
    """Set one element of each of ``task``'s adapter tensors to ``value``; returns an undo."""
    params = program.states[task].params
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.view(-1)[p.numel() // 2] = value

    def undo():
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    return undo


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("task,value", [("b", math.nan), ("c", math.inf), ("b", -math.inf)],
                         ids=["lora nan", "ia3 inf", "lora -inf"])
def test_nonfinite_adapter_leaves_others_bit_identical(compiled, fusion, task, value):
    program = compiled.with_options(fusion=fusion)
    want = _run(program, _batches())
    undo = _poison(program, task, value)
    try:
        got = _run(program, _batches())
    finally:
        undo()
    assert not math.isfinite(got[0][task].item())
    _assert_untouched(want, got, OTHERS[task], exact=True)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_values_in_a_batch_are_refused_in_every_mode(compiled, fusion, value):
    program = compiled.with_options(fusion=fusion)
    batches = _batches()
    mask = batches["b"]["attention_mask"].float()
    mask[1, 2] = value
    batches["b"]["attention_mask"] = mask
    before = training_snapshot(program)
    with pytest.raises(muxc.BatchError, match=rf"task 'b': attention_mask value {value} at \[1, 2\]"):
        program.step(batches)
    assert same(training_snapshot(program), before)
