"""Pass `fuse_lm_head_loss`: before / pass / after on a merged tiny Llama, the cases it must
leave alone, and the fused program's losses and grads vs isolated HF PEFT at 1e-5."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import merged_graph, rel_err, separate
from models import build_base, lora_and_ia3_tasks, make_batch

import muxc
from muxc.ir import LMHeadLoss, TaskLoss
from muxc.passes import CompileContext, fuse_lm_head_loss

_LINEAR = torch.ops.aten.linear.default


@pytest.fixture(scope="module")
def base():
    return build_base("llama")


@pytest.fixture(scope="module")
def merged(base):
    return merged_graph(lora_and_ia3_tasks(base))[0]


def _targets(mux, kind):
    return [n for n in mux.gm.graph.nodes if isinstance(n.target, kind)]


def test_fuses_the_frozen_head_into_each_loss(merged):
    before = _targets(merged, TaskLoss)
    head = before[0].args[0]
    assert head.target is _LINEAR and {u.target.task for u in head.users} == {"a", "b"}
    result = fuse_lm_head_loss(merged, CompileContext(muxc.Options()))
    after = result.value
    assert "2 task losses fused" in result.notes
    assert _targets(after, TaskLoss) == []
    fused = _targets(after, LMHeadLoss)
    assert [n.target.task for n in fused] == ["a", "b"]
    for n in fused:  # the head's input rows and its frozen weight, no logits node left
        assert n.args[0].name == head.args[0].name and n.args[2].name == head.args[1].name
        assert not merged.tensors[n.args[2].name].requires_grad
    assert not any(n.target is _LINEAR and n.name == head.name for n in after.gm.graph.nodes)
    assert _targets(merged, TaskLoss) == before  # the input is not mutated


def test_leaves_transformed_logits_alone(merged):
    """Softcapping (Gemma 2), scaling or a cast between the head and the loss: not a pair."""
    gm = torch.fx.GraphModule(merged.gm, copy.deepcopy(merged.gm.graph))
    head = _targets(dataclasses.replace(merged, gm=gm), TaskLoss)[0].args[0]
    with gm.graph.inserting_after(head):
        capped = gm.graph.call_function(torch.ops.aten.tanh.default, (head,))
    head.replace_all_uses_with(capped, delete_user_cb=lambda u: u is not capped)
    capped_mux = dataclasses.replace(merged, gm=gm)
    result = fuse_lm_head_loss(capped_mux, CompileContext(muxc.Options()))
    assert result.value is capped_mux and "nothing fused" in result.notes


def test_leaves_a_trained_head_alone(merged):
    head = _targets(merged, TaskLoss)[0].args[0]
    tensors = dict(merged.tensors)
    name = head.args[1].name
    tensors[name] = tensors[name].detach().clone().requires_grad_()
    trained = dataclasses.replace(merged, tensors=tensors)
    result = fuse_lm_head_loss(trained, CompileContext(muxc.Options()))
    assert result.value is trained and "nothing fused" in result.notes


@pytest.fixture(scope="module")
def cases(base):
    """One compile per alignment (references first), reused across run-time options."""
    built = {}

    def get(alignment):
        if alignment not in built:
            spec = [(t.name, t.model) for t in lora_and_ia3_tasks(base)]
            batches = {"a": make_batch(3, 9, 1, pad_rows=2), "b": make_batch(2, 6, 2)}
            built[alignment] = separate(spec, batches, alignment=alignment)
        return built[alignment]

    return get


@pytest.mark.parametrize("alignment,options", [("pad", {}), ("pad", dict(micro_batches=2)),
                                               ("chunk", dict(chunk_size=4))])
def test_fused_program_matches_isolated_hf(cases, alignment, options):
    case = cases(alignment)
    history = {r.name: r.summary for r in case.program.history}
    assert "2 task losses fused" in history["fuse_lm_head_loss"]
    program = case.program.with_options(**options)
    case.zero_grad()
    losses = program.forward_backward(case.batches)
    for name, (ref_loss, ref_grads) in case.refs.items():
        assert rel_err(losses[name], ref_loss) <= 1e-5, name
        got = case.grads(name)
        assert set(got) == set(ref_grads) and ref_grads
        for pname, g in ref_grads.items():
            assert g.norm() > 0 and rel_err(got[pname], g) <= 1e-5, (name, pname)
    case.zero_grad()
