"""The pass driver: typed state, pass results with notes, records rendered when a pass ran.

One chunk-aligned compile (LoRA + IA3 on the tiny Llama) is shared by the module; pass-level
tests re-run single passes on its state, which is cheap next to tracing.
"""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, fields, replace

import pytest
import torch
from models import make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.dump import dump_history
from muxc.errors import MuxcInternalError
from muxc.ir import SDPA, Binding, ChunkAttention
from muxc.passes import (
    CompileContext,
    PassResult,
    merge_backbones,
    rewrite_attention,
    share_frozen_weights,
)
from muxc import pipeline
from muxc.pipeline import PIPELINE, CompileState, Pass, run_pipeline

CHUNK = muxc.Options(alignment="chunk", chunk_size=4, verify=True)


@pytest.fixture(scope="module")
def compiled(llama):
    lora_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    lora = make_peft(llama, lora_config, 1)
    ia3_config = IA3Config(target_modules=["k_proj", "down_proj"],
                           feedforward_modules=["down_proj"])
    ia3 = make_peft(llama, ia3_config, 2)
    tasks = [muxc.Task(name="a", model=lora), muxc.Task(name="b", model=ia3)]
    return run_pipeline(tasks, CompileContext(CHUNK))


def _calls(gm, target_type=None, target=None):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and ((target_type and isinstance(n.target, target_type)) or n.target is target)]


def test_state_is_typed_and_complete(compiled):
    state, history = compiled
    assert isinstance(state, CompileState)
    assert [t.name for t in state.tasks] == ["a", "b"] and isinstance(state.tasks, tuple)
    assert [tg.task for tg in state.task_graphs] == ["a", "b"]
    assert state.mux_graph.tasks == ("a", "b")
    assert state.partitioned.mux is state.mux_graph
    assert state.kernel_plan.choices
    assert set(state.sharing.values()) == {"value"}  # make_peft gives each task its own base copy
    with pytest.raises(FrozenInstanceError):
        state.mux_graph = None
    assert [r.index for r in history] == list(range(len(PIPELINE)))
    assert [r.name for r in history] == [p.name for p in PIPELINE]


def test_context_holds_only_options_progress_and_kept_exports():
    assert {f.name for f in fields(CompileContext)} == {"options", "on_progress", "exports"}
    seen = []
    ctx = CompileContext(muxc.Options(), on_progress=lambda *a: seen.append(a))
    ctx.progress("trace", 1, 2, "a")
    assert seen == [("trace", 1, 2, "a")]
    with pytest.raises(FrozenInstanceError):
        ctx.options = muxc.Options(stages=2)


def test_history_summaries_carry_each_pass_notes(compiled):
    _, history = compiled
    by_name = {r.name: r for r in history}
    rewrite, part = by_name["rewrite_attention"].summary, by_name["partition"].summary
    assert rewrite.startswith("2 attention nodes made chunk-aware; MuxGraph(")
    assert part.startswith("8 PEFT groups for 8 sites; 1 stages, max/mean cost 1.000; Partitioned")
    assert "SharingReport(" in by_name["share_frozen_weights"].summary
    assert by_name["merge_backbones"].summary.startswith("MuxGraph(llama, tasks=['a', 'b']")


def test_dump_shows_each_pass_own_output(compiled, tmp_path):
    """Rewrite_attention must not leak into the merge record (it used to: live objects)."""
    _, history = compiled
    dump_history(history, tmp_path)
    merged = (tmp_path / "pass_03_merge_backbones.txt").read_text()
    rewritten = (tmp_path / "pass_04_rewrite_attention.txt").read_text()
    assert "chunk_attention" not in merged and "scaled_dot_product_attention" in merged
    assert "chunk_attention_0" in rewritten and "chunk_attention_1" in rewritten
    assert "scaled_dot_product_attention" not in rewritten
    assert "# 2 attention nodes made chunk-aware" in rewritten
    shared = (tmp_path / "pass_02_share_frozen_weights.txt").read_text()
    assert "TaskGraph('a'" in shared and "SharingReport(" in shared
    assert re.search(r"\nmodel\.layers\.0\.self_attn\.q_proj\.weight +value\n", shared)


def test_rewrite_attention_returns_a_new_graph_and_leaves_its_input(compiled):
    state, _ = compiled
    merged = merge_backbones(state.task_graphs, CompileContext(CHUNK)).value
    code, names = merged.gm.code, [n.name for n in merged.gm.graph.nodes]
    out = rewrite_attention(merged, CompileContext(CHUNK))
    assert out.notes == "2 attention nodes made chunk-aware"
    new = out.value
    assert new is not merged and new.gm is not merged.gm
    assert merged.gm.code == code and [n.name for n in merged.gm.graph.nodes] == names
    assert len(_calls(merged.gm, target=SDPA)) == 2 and not _calls(merged.gm, ChunkAttention)
    assert len(_calls(new.gm, ChunkAttention)) == 2 and not _calls(new.gm, target=SDPA)
    assert new.tensors is merged.tensors and new.sites is merged.sites  # tensors shared, not copied
    pad = rewrite_attention(merged, CompileContext(muxc.Options(alignment="pad")))
    assert pad.value is merged and pad.notes == "alignment='pad': attention left as exported"


def test_share_frozen_weights_returns_new_graphs_and_leaves_its_input(compiled):
    state, _ = compiled
    first, second = state.task_graphs
    copies = {ph: Binding(b.kind, b.fqn, b.tensor.clone())
              for ph, b in second.frozen_bindings().items()}
    unshared = replace(second, bindings={**second.bindings, **copies})
    before = dict(unshared.bindings)
    graphs, report = share_frozen_weights((first, unshared), CompileContext(CHUNK)).value
    assert unshared.bindings == before and all(
        unshared.bindings[ph].tensor is b.tensor for ph, b in copies.items())
    assert graphs[0].bindings == first.bindings and graphs[1] is not unshared
    ref = {b.fqn: b.tensor for b in first.frozen_bindings().values()}
    assert all(b.tensor is ref[b.fqn] for b in graphs[1].frozen_bindings().values())
    assert set(report.values()) == {"value"} and len(report) == len(ref)


def test_pipeline_names_only_state_fields():
    names = {f.name for f in fields(CompileState)}
    assert all({p.reads, *p.outputs} <= names for p in PIPELINE)
    with pytest.raises(MuxcInternalError, match=r"'graphs'.*not CompileState fields"):
        Pass(_one, "tasks", "graphs", "typo")


def test_every_pass_says_whether_it_mutates():
    for p in PIPELINE:
        first = p.fn.__doc__.strip().splitlines()[0]
        assert "mutate" in first, (p.name, first)


# Stand-in passes for driver tests (no tracing): each is named by its function.
def _one(values, ctx):
    return PassResult(values, "did one")


def _two(values, ctx):
    return PassResult(tuple(values))


def _bare(values, ctx):
    return values


def _make(values, ctx):
    return PassResult([torch.zeros(1)])


def _bump(values, ctx):
    values[0].add_(1)  # a (bad) pass that mutates the previous pass's output in place
    return PassResult(values)


def test_driver_rejects_a_pass_that_breaks_the_contract(monkeypatch):
    ctx = CompileContext(muxc.Options())
    monkeypatch.setattr(pipeline, "PIPELINE", (Pass(_bare, "tasks", "tasks", ""),))
    with pytest.raises(MuxcInternalError, match="'_bare' returned list, not a PassResult"):
        run_pipeline(["x"], ctx)
    monkeypatch.setattr(pipeline, "PIPELINE", (Pass(_one, "tasks", ("tasks", "sharing"), ""),))
    with pytest.raises(MuxcInternalError, match=r"'_one' writes \('tasks', 'sharing'\)"):
        run_pipeline(["x"], ctx)


def test_verify_runs_after_every_pass_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "verify_state", lambda name, *a, **k: calls.append(name))
    steps = (Pass(_one, "tasks", "tasks", ""), Pass(_two, "tasks", "tasks", ""))
    monkeypatch.setattr(pipeline, "PIPELINE", steps)
    state, history = run_pipeline(["x"], CompileContext(muxc.Options(verify=True)))
    assert calls == ["_one", "_two"] and state.tasks == ("x",)
    assert [r.summary for r in history] == ["did one; ['x']", "['x']"]
    calls.clear()
    run_pipeline(["x"], CompileContext(muxc.Options()))
    assert calls == []


def test_record_text_is_fixed_when_the_pass_ran(monkeypatch):
    steps = (Pass(_make, "tasks", "tasks", ""), Pass(_bump, "tasks", "tasks", ""))
    monkeypatch.setattr(pipeline, "PIPELINE", steps)
    _, history = run_pipeline(["x"], CompileContext(muxc.Options()))
    assert "tensor([0.])" in history[0].text and "tensor([1.])" in history[1].text
