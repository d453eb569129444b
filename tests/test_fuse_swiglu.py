"""`swiglu` and pass `fuse_swiglu`: bit-for-bit the unfused ops' results while keeping two
tensors for backward instead of three; the pass on a merged tiny Llama, what it leaves alone,
and the program's losses and grads vs isolated HF PEFT at 1e-5."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import merged_graph, separate
from models import lora_and_ia3_tasks, make_batch, make_peft
from peft import LoraConfig

import muxc
from muxc.kernels.swiglu import swiglu
from muxc.passes import CompileContext, fuse_swiglu

aten = torch.ops.aten


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_swiglu_is_bitwise_the_unfused_ops(dtype, need):
    torch.manual_seed(0)
    g = torch.randn(5, 37, dtype=dtype, requires_grad=need[0])
    u = torch.randn(5, 37, dtype=dtype, requires_grad=need[1])
    grad = torch.randn(5, 37, dtype=dtype)
    inputs = [x for x in (g, u) if x.requires_grad]
    ref = torch.nn.functional.silu(g) * u
    out = swiglu(g, u)
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert torch.equal(a, b)


def test_swiglu_keeps_gate_and_up_only():
    g = torch.randn(4, 8, requires_grad=True)
    u = torch.randn(4, 8, requires_grad=True)
    kept = swiglu(g, u).grad_fn.saved_tensors
    assert [t.data_ptr() for t in kept] == [g.data_ptr(), u.data_ptr()]
    # unfused, autograd keeps silu(gate) as well: three tensors
    ref = torch.nn.functional.silu(g) * u
    saved = {ref.grad_fn._saved_self.data_ptr(), ref.grad_fn._saved_other.data_ptr(),
             ref.grad_fn.next_functions[0][0]._saved_self.data_ptr()}
    assert len(saved) == 3
    only_up = torch.randn(4, 8).requires_grad_(False)
    assert [t is None for t in swiglu(only_up, u).grad_fn.saved_tensors] == [False, True]


@pytest.fixture(scope="module")
def merged(llama):
    return merged_graph(lora_and_ia3_tasks(llama))[0]


def _count(mux, target):
    return sum(1 for n in mux.gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_fuses_each_layers_product(llama, merged):
    layers = llama.config.num_hidden_layers
    assert _count(merged, aten.silu.default) == layers
    result = fuse_swiglu(merged, CompileContext(muxc.Options()))
    fused = result.value
    assert f"{layers} silu(gate) * up product(s) fused" in result.notes
    assert _count(fused, swiglu) == layers and _count(fused, aten.silu.default) == 0
    for n in fused.gm.graph.nodes:
        if n.target is swiglu:  # reads the gate projection's output, feeds down_proj's site
            assert n.args[0].meta["val"].shape == n.args[1].meta["val"].shape == n.meta["val"].shape
    assert _count(merged, aten.silu.default) == layers  # the input is not mutated


def test_leaves_a_silu_read_elsewhere_alone(merged, bases):
    gm = torch.fx.GraphModule(merged.gm, copy.deepcopy(merged.gm.graph))
    silu = next(n for n in gm.graph.nodes if n.target is aten.silu.default)
    with gm.graph.inserting_after(silu):
        gm.graph.call_function(aten.neg.default, (silu,))  # a second reader
    result = fuse_swiglu(dataclasses.replace(merged, gm=gm), CompileContext(muxc.Options()))
    layers = _count(merged, aten.silu.default)
    assert f"{layers - 1} silu(gate) * up product(s) fused" in result.notes
    gpt2 = bases("gpt2")
    task = muxc.Task(name="g", model=make_peft(gpt2, LoraConfig(r=2, lora_dropout=0.0), 1))
    history = {r.name: r.summary for r in muxc.compile([task]).history}
    assert history["fuse_swiglu"].startswith("no silu(gate) * up product")


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_program_matches_isolated_hf(llama, alignment):
    spec = [(t.name, t.model) for t in lora_and_ia3_tasks(llama)]
    batches = {"a": make_batch(3, 9, 1, pad_rows=2), "b": make_batch(2, 6, 2)}
    case = separate(spec, batches, alignment=alignment)
    history = {r.name: r.summary for r in case.program.history}
    assert "product(s) fused" in history["fuse_swiglu"]
    # task a's LoRA on gate_proj and up_proj: the gradients through swiglu's both inputs
    assert any("gate_proj" in p for p in case.refs["a"][1]) and any("up_proj" in p for p in case.refs["a"][1])
    case.check(tol=1e-5, **({"chunk_size": 4} if alignment == "chunk" else {}))
