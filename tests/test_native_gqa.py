"""Pass `native_gqa`: before / pass / after on a merged tiny grouped-query Llama (4 query heads,
2 K/V heads), the graphs it must leave alone, and the program's losses and grads vs isolated
HF PEFT at 1e-5 with alignment pad and chunk (attention and kept K/V on unrepeated heads)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import merged_graph, separate
from models import make_batch, make_peft
from peft import LoraConfig

import muxc
from muxc.ir import SDPA, ChunkAttention
from muxc.passes import native_gqa, rewrite_attention
from muxc.passes.native_gqa import repeated_heads

_EXPAND = torch.ops.aten.expand.default


def _tasks(base):
    return [muxc.Task(name=n, model=make_peft(base, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj"],
                                                              lora_dropout=0.0), i))
            for i, (n, r) in enumerate((("a", 4), ("b", 2)))]


def _merged(base, alignment):
    mux, ctx = merged_graph(_tasks(base), alignment=alignment)
    return rewrite_attention(mux, ctx).value, ctx


def _attention(mux):
    return [n for n in mux.gm.graph.nodes
            if n.op == "call_function" and (n.target is SDPA or isinstance(n.target, ChunkAttention))]


@pytest.fixture(scope="module")
def base(llama):
    """The suite's tiny Llama: grouped-query attention."""
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    return llama


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_attention_reads_the_kv_heads_unrepeated(base, alignment):
    mux, ctx = _merged(base, alignment)
    before = _attention(mux)
    layers = base.config.num_hidden_layers
    assert len(before) == layers
    rep = base.config.num_attention_heads // base.config.num_key_value_heads
    skip = 1 if alignment == "chunk" else 0
    for n in before:  # as exported: K and V repeated to every query head
        assert [repeated_heads(n.args[skip + i])[1] for i in (1, 2)] == [rep, rep]
        assert "enable_gqa" not in n.kwargs
    expands = sum(1 for n in mux.gm.graph.nodes if n.target is _EXPAND)
    result = native_gqa(mux, ctx)
    assert f"{layers} attention node(s) read grouped K/V heads unrepeated" in result.notes
    after = _attention(result.value)
    for n in after:
        assert n.kwargs["enable_gqa"] is True
        for i in (1, 2):
            kv = n.args[skip + i].meta["val"]
            assert kv.shape[1] == base.config.num_key_value_heads
    # the two expands per layer went (with their reshapes), nothing else did
    assert sum(1 for n in result.value.gm.graph.nodes if n.target is _EXPAND) == expands - 2 * layers
    assert all("enable_gqa" not in n.kwargs for n in _attention(mux))  # input not mutated


def test_leaves_other_graphs_alone(base, bases):
    mux, ctx = _merged(base, "pad")
    on_meta = dataclasses.replace(mux, tensors={k: t.to("meta") for k, t in mux.tensors.items()})
    result = native_gqa(on_meta, ctx)
    assert result.value is on_meta and "left as exported: backbone on meta" in result.notes
    gpt2 = bases("gpt2")
    task = muxc.Task(name="g", model=make_peft(gpt2, LoraConfig(r=2, lora_dropout=0.0), 1))
    history = {r.name: r.summary for r in muxc.compile([task]).history}
    assert history["native_gqa"].startswith("no attention repeats its K/V heads")


@pytest.mark.parametrize("alignment,options", [("pad", {}), ("chunk", dict(chunk_size=4))])
def test_program_matches_isolated_hf(base, alignment, options):
    spec = [(t.name, t.model) for t in _tasks(base)]
    batches = {"a": make_batch(3, 9, 1, pad_rows=2), "b": make_batch(2, 6, 2)}
    case = separate(spec, batches, alignment=alignment)
    history = {r.name: r.summary for r in case.program.history}
    assert "read grouped K/V heads unrepeated" in history["native_gqa"]
    assert any(".k_proj." in p for p in case.refs["a"][1])  # K's gradient crosses the groups
    case.check(tol=1e-5, **options)
