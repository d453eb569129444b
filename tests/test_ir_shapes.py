"""The op table (`muxc.ir.optable`) and the symbolic-shape evaluator (`muxc.ir.shapes`)."""

from __future__ import annotations

import operator

import pytest
import sympy
import torch
import torch.fx as fx
from models import make_peft
from peft import LoraConfig

import muxc
from muxc.ir import ShapeHint
from muxc.ir.optable import (
    FREE,
    GEMMS,
    VIEWS,
    aliases_input,
    attention_call,
    gemm_operands,
    has_bias,
    is_gemm,
    is_view,
)
from muxc.ir.shapes import B, S, GraphShapes, meta_val

aten = torch.ops.aten


@pytest.fixture(scope="module")
def muxes(llama):
    model = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 1)
    tasks = [muxc.Task(name="a", model=model)]
    return {
        "pad": muxc.compile(tasks, muxc.Options(alignment="pad")).mux,
        "chunk": muxc.compile(tasks, muxc.Options(alignment="chunk", chunk_size=4)).mux,
    }


def _node(mux, name):
    return next(n for n in mux.gm.graph.nodes if n.name == name)


def test_sizes_are_expressions_in_rows_and_seq(muxes):
    mux = muxes["pad"]
    shapes = GraphShapes(mux)
    assert shapes.dynamic and set(shapes.symbols.values()) == {B, S}
    q = meta_val(_node(mux, "linear"))  # layer 0 q_proj: (b, s, 32)
    assert sympy.expand(shapes.numel(q) - 32 * B * S) == 0
    assert shapes.expr(7) == 7
    sizes = shapes.at(ShapeHint(rows=3, seq=5))
    assert sizes.numel(q) == 3 * 5 * 32
    assert sizes.nbytes(q) == 3 * 5 * 32 * 4
    assert sizes.nbytes((q, q)) == 2 * sizes.nbytes(q)
    assert sizes.nbytes(None) == 0 and sizes.nbytes(3) == 8 and sizes.dim(6) == 6


def test_broadcast_dims_count_only_when_asked(llama):
    # the merged graph as exported: grouped K/V heads repeated with expand (pass native_gqa,
    # later in the pipeline, removes those repeats)
    from helpers import merged_graph

    model = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 1)
    mux, _ = merged_graph([muxc.Task(name="a", model=model)])
    shapes = GraphShapes(mux)
    expands = [n for n in mux.gm.graph.nodes
               if n.target is aten.expand.default and isinstance(meta_val(n), torch.Tensor)
               and 0 in meta_val(n).stride()]
    assert expands, "the exported llama graph broadcasts (K/V heads) with expand"
    v = meta_val(expands[0])
    full, effective = shapes.numel(v), shapes.numel(v, effective=True)
    assert full != effective
    assert sympy.expand(full - effective * _broadcast_factor(shapes, v)) == 0


def _broadcast_factor(shapes, v):
    f = sympy.Integer(1)
    for d, st in zip(v.shape, v.stride()):
        if st == 0:
            f *= shapes.expr(d)
    return f


def test_op_table_classifies_the_exported_graph(muxes):
    mux = muxes["pad"]
    nodes = list(mux.gm.graph.nodes)
    linear = _node(mux, "linear")
    assert is_gemm(linear) and not is_view(linear)
    views = [n for n in nodes if n.target is aten.view.default]
    assert views and all(is_view(n) and not is_gemm(n) for n in views)
    assert VIEWS < FREE and not (VIEWS & GEMMS)
    assert aliases_input(aten.view.default) and aliases_input(operator.getitem)
    assert aliases_input(aten.to.dtype)  # may alias, but copies when the dtype changes
    assert aten.to not in VIEWS
    assert not aliases_input(aten.add.Tensor) and not aliases_input(aten.add_.Tensor)


def test_gemm_operands_and_bias():
    g = fx.Graph()
    a, b, c = (g.placeholder(x) for x in "abc")
    addmm = g.call_function(aten.addmm.default, (a, b, c))
    mm = g.call_function(aten.mm.default, (a, b))
    baddbmm = g.call_function(aten.baddbmm.default, (a, b, c))
    linear = g.call_function(aten.linear.default, (a, b, None))
    assert gemm_operands(addmm) == (b, c) and gemm_operands(baddbmm) == (b, c)
    assert gemm_operands(mm) == (a, b) and gemm_operands(linear) == (a, b)
    assert has_bias(addmm) and has_bias(baddbmm)
    assert not has_bias(mm) and not has_bias(linear)
    assert all(is_gemm(n) for n in (addmm, mm, baddbmm, linear))


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_attention_call_reads_sdpa_and_chunk_attention(muxes, alignment):
    mux = muxes[alignment]
    calls = [(n, attention_call(n)) for n in mux.gm.graph.nodes]
    calls = [(n, c) for n, c in calls if c is not None]
    assert len(calls) == 2  # one per decoder layer
    for node, (args, _kwargs, chunked) in calls:
        assert chunked is (alignment == "chunk")
        q, k, v = (meta_val(x) for x in args[:3])
        assert q.dim() == k.dim() == v.dim() == 4
        assert node.all_input_nodes[0 if not chunked else 1] is args[0]
    assert attention_call(_node(mux, "linear")) is None
