"""`muxc.verify` catches broken IRs: each check is fed a real graph with one thing broken.

One small 2-task program is compiled (with ``verify=True``, so the real graphs pass every
check); each test copies its graph, breaks one invariant, and asserts the check names it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
from models import make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.errors import MuxcInternalError
from muxc.ir import META_KEY, MuxGraph, Role, TaskGraph, info, set_info
from muxc.passes.pass_base import PassResult
from muxc.verify import verify_mux_graph, verify_state, verify_task_graph


@pytest.fixture(scope="module")
def program(llama):
    lora = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1)
    ia3 = make_peft(llama, IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), 2)
    tasks = [muxc.Task(name="a", model=lora), muxc.Task(name="b", model=ia3)]
    from muxc.api import Program
    from muxc.pipeline import CompileContext, run_pipeline

    options = muxc.Options(verify=True)
    state, history = run_pipeline(tasks, CompileContext(options=options))
    program = Program(state, options, history)
    program.task_graphs = {tg.task: tg for tg in state.task_graphs}  # compile drops them
    return program


def _copy_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule on a copy of ``gm``'s graph (node meta dicts copied, records shared)."""
    return fx.GraphModule(gm, gm.graph.__deepcopy__())


def _mux(program) -> MuxGraph:
    """A copy of the program's MuxGraph that a test may break without touching the program."""
    mux = program.mux
    return dataclasses.replace(mux, gm=_copy_gm(mux.gm), tensors=dict(mux.tensors), sites=dict(mux.sites))


def _task(program, name: str) -> TaskGraph:
    tg = program.task_graphs[name]
    return dataclasses.replace(tg, gm=_copy_gm(tg.gm), bindings=dict(tg.bindings), adapters=list(tg.adapters))


def _nodes(mux: MuxGraph, role: Role, task: str | None = None) -> list[fx.Node]:
    return [n for n in mux.nodes_with(role) if task is None or task in info(n).tasks]


def test_the_compiled_graphs_pass_every_check(program):
    mux = _mux(program)
    verify_mux_graph("p", mux)
    for name in mux.tasks:
        verify_task_graph("p", _task(program, name))
    verify_state("share_frozen_weights", [_task(program, n) for n in mux.tasks], mux, shared=True)


def test_adapter_param_owned_by_two_tasks(program):
    mux = _mux(program)
    node = _nodes(mux, Role.ADAPTER_PARAM, "a")[0]
    set_info(node, dataclasses.replace(info(node), tasks=frozenset({"a", "b"})))
    with pytest.raises(MuxcInternalError,
                       match=rf"after pass 'merge_backbones': adapter param {node.name} owned by \['a', 'b'\]"):
        verify_mux_graph("merge_backbones", mux)


def test_one_adapter_tensor_bound_for_two_tasks(program):
    mux = _mux(program)
    a, b = _nodes(mux, Role.ADAPTER_PARAM, "a")[0], _nodes(mux, Role.ADAPTER_PARAM, "b")[0]
    first, second = sorted([a, b], key=lambda n: list(mux.gm.graph.nodes).index(n))
    mux.tensors[second.name] = mux.tensors[first.name]
    owner = next(iter(info(first).tasks))
    with pytest.raises(MuxcInternalError, match=rf"adapter tensor {second.name} also bound for task {owner}"):
        verify_mux_graph("merge_backbones", mux)


def test_site_serving_a_task_twice(program):
    mux = _mux(program)
    node = next(n for n in mux.nodes_with(Role.ADAPTER) if len(info(n).adapters) == 1)
    rec = info(node)
    set_info(node, dataclasses.replace(rec, adapters=rec.adapters * 2))
    task = rec.adapters[0].task
    with pytest.raises(MuxcInternalError, match=rf"site {rec.site} serves a task twice: \['{task}', '{task}'\]"):
        verify_mux_graph("merge_backbones", mux)


def test_frozen_placeholder_bound_to_an_adapter_tensor(program):
    mux = _mux(program)
    frozen = _nodes(mux, Role.FROZEN)[0]
    mux.tensors[frozen.name] = mux.tensors[_nodes(mux, Role.ADAPTER_PARAM)[0].name]
    with pytest.raises(MuxcInternalError, match="a frozen placeholder is bound to an adapter tensor"):
        verify_mux_graph("partition", mux)


def test_a_task_without_its_loss_node(program):
    mux = _mux(program)
    loss = _nodes(mux, Role.LOSS, "b")[0]
    set_info(loss, dataclasses.replace(info(loss), role=Role.BACKBONE))
    with pytest.raises(MuxcInternalError, match="1 loss nodes for 2 tasks"):
        verify_mux_graph("merge_backbones", mux)


def test_backbone_node_missing_its_record(program):
    mux = _mux(program)
    node = _nodes(mux, Role.BACKBONE)[3]
    del node.meta[META_KEY]
    # the merged-graph check reaches the node through `info`, which names the node (not the pass)
    with pytest.raises(MuxcInternalError, match=rf"node .*{node.name}.* has no muxc record"):
        verify_mux_graph("merge_backbones", mux)


def test_node_used_before_it_is_defined(program):
    mux = _mux(program)
    graph = mux.gm.graph
    user = _nodes(mux, Role.BACKBONE)[5]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    first_op.prepend(user)  # now ahead of what it reads: not a topological order
    # fx's own lint finds it; verify does not wrap it (a RuntimeError without the pass name)
    with pytest.raises(RuntimeError, match="used before it has been defined"):
        verify_mux_graph("merge_backbones", mux)


def test_node_reading_a_node_of_another_graph(program):
    mux, other = _mux(program), _mux(program)
    node = _nodes(mux, Role.BACKBONE)[5]
    stranger = next(n for n in other.gm.graph.nodes if n.name == node.args[0].name)
    node.replace_input_with(node.args[0], stranger)
    with pytest.raises(RuntimeError, match="does not belong to this Graph"):
        verify_mux_graph("merge_backbones", mux)


def test_task_graph_node_missing_its_record(program):
    tg = _task(program, "a")
    node = next(n for n in tg.gm.graph.nodes if n.op == "call_function")
    del node.meta[META_KEY]
    with pytest.raises(MuxcInternalError,
                       match=rf"after pass 'trace_tasks': a: .*{node.name}.* has no muxc record"):
        verify_task_graph("trace_tasks", tg)


def test_task_graph_adapter_count_differs_from_its_records(program):
    tg = _task(program, "b")
    n = len(tg.adapters)
    assert n > 1
    tg.adapters.pop()
    with pytest.raises(MuxcInternalError, match=rf"b: {n} adapter nodes for {n - 1} adapters"):
        verify_task_graph("trace_tasks", tg)


def test_shared_frozen_weight_that_is_not_the_shared_tensor(program):
    graphs = [_task(program, n) for n in ("a", "b")]
    name, binding = next((k, v) for k, v in graphs[1].frozen_bindings().items() if v.tensor.dim() == 2)
    # an equal copy is still a second copy of the base: the pass must have aliased it
    graphs[1].bindings[name] = dataclasses.replace(binding, tensor=binding.tensor.clone())
    with pytest.raises(MuxcInternalError,
                       match=rf"after pass 'share_frozen_weights': b: {binding.fqn} is not the shared tensor"):
        verify_state("share_frozen_weights", graphs, None, shared=True)
    # the check does not run before the weights are shared (only that pass aliases them)
    verify_state("trace_tasks", graphs, None, shared=False)


def test_verify_state_checks_the_merged_graph_too(program):
    mux = _mux(program)
    loss = _nodes(mux, Role.LOSS, "a")[0]
    set_info(loss, dataclasses.replace(info(loss), role=Role.BACKBONE))
    with pytest.raises(MuxcInternalError, match="after pass 'select_kernels': 1 loss nodes for 2 tasks"):
        verify_state("select_kernels", (), mux, shared=True)


def test_the_driver_runs_verify_after_each_pass(program, monkeypatch):
    """A pass that breaks the graph is named by the check run right after it (verify=True)."""
    from muxc import pipeline

    def load(tasks, ctx):  # stands in for the passes that build the graph (no re-tracing)
        return PassResult(_mux(program))

    def drop_a_loss(mux, ctx):
        loss = mux.nodes_with(Role.LOSS)[0]
        set_info(loss, dataclasses.replace(info(loss), role=Role.BACKBONE))
        return PassResult(mux)

    monkeypatch.setattr(pipeline, "PIPELINE", (
        pipeline.Pass(load, "tasks", "mux_graph", "test: a real merged graph"),
        pipeline.Pass(drop_a_loss, "mux_graph", "mux_graph", "test: breaks an invariant"),
    ))
    with pytest.raises(MuxcInternalError, match="after pass 'drop_a_loss': 1 loss nodes for 2 tasks"):
        pipeline.run_pipeline([], pipeline.CompileContext(options=muxc.Options(verify=True)))
    # without verify the broken graph goes unseen: the checks are what catches it
    state, history = pipeline.run_pipeline([], pipeline.CompileContext(options=muxc.Options()))
    assert [r.name for r in history] == ["load", "drop_a_loss"]
    assert len(state.mux_graph.nodes_with(Role.LOSS)) == 1


def test_checks_leave_the_real_program_intact(program):
    # every test above broke a copy: the program still verifies and still runs
    verify_mux_graph("end", program.mux)
    assert all(META_KEY in n.meta for n in program.mux.gm.graph.nodes)
    ids = torch.randint(3, 90, (1, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = program.evaluate({"a": batch, "b": batch})
    assert set(losses) == {"a", "b"} and all(torch.isfinite(v) for v in losses.values())
