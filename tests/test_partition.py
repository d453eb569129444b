"""Partition pass: subgraph kinds, balanced monotone stages, stages run in sequence == whole graph."""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
import torch
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.dump.dot import GraphvizNotFoundError, partitioned_dot, render, write_dot
from muxc.errors import OptionsError
from muxc.ir import Role, info
from muxc.ir import PartitionedGraph, SubgraphKind
from muxc.runtime.stages import run_stages
from muxc.passes.partition import balance, partition, partition_ids
from muxc.passes.pass_base import CompileContext
from muxc.plan.stage_cost import FlopCost, LatencyCost
from muxc.ir import MuxBatch
from muxc.runtime.batch import build_batch
from muxc.ir.chunks import build_layout

BATCHES = {"a": make_batch(2, 9, 0), "b": make_batch(3, 6, 1, pad_rows=2)}


def _tasks(base):
    """One LoRA task on q,v and one IA3 task on k,v and the MLP input of down_proj."""
    lora = make_peft(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1)
    ia3 = make_peft(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"]), 2)
    return [muxc.Task(name="a", model=lora), muxc.Task(name="b", model=ia3)]


@pytest.fixture(scope="module")
def programs(llama):
    tasks = _tasks(llama)
    return {
        "pad": muxc.compile(tasks, muxc.Options(alignment="pad")),
        "chunk": muxc.compile(tasks, muxc.Options(alignment="chunk", chunk_size=4)),
    }


@pytest.fixture(scope="module")
def mux(programs):
    return programs["pad"].mux


def _bound(mux):
    return [mux.tensors[n] for n in mux.input_names() if n in mux.tensors]


def _steps(program, batches):
    """Per forward call: the graph arguments after the bound tensors, as LocalExecutor builds them.

    Yields fresh MuxBatch objects each time it is iterated (chunk steps share a K/V dict that
    the graph fills, so two runs must not share it).
    """
    mux = program.mux
    if program.options.alignment.value == "pad":
        ids, mask, batch = build_batch(batches, mux.tasks, torch.device("cpu"), None, True)
        yield [ids, mask, batch]
        return
    layout = build_layout(batches, mux.tasks, program.options.chunk_size, torch.device("cpu"))
    assert len(layout.steps) > 1, "the chunk test must cross chunks"
    kv: dict = {}
    for step in layout.steps:
        labels = tuple(torch.split(step.labels, list(step.rows)))
        scale = tuple(1.0 / layout.label_counts[t] for t in step.tasks)
        batch = MuxBatch(tasks=step.tasks, rows=step.rows, seq_len=layout.chunk_size, labels=labels,
                         training=True, shifted=True, loss_scale=scale, chunk=step, kv=kv)
        yield [step.ids, torch.ones_like(step.ids), step.positions, batch]


def _losses_and_grads(program, call):
    mux = program.mux
    bound = _bound(mux)
    totals: dict[str, torch.Tensor] = {}
    for rest in _steps(program, BATCHES):
        for t, loss in zip(mux.tasks, call(*bound, *rest)):
            if loss is not None:
                totals[t] = loss if t not in totals else totals[t] + loss
    params = [mux.tensors[n.name] for n in mux.nodes_with(Role.ADAPTER_PARAM)]
    grads = torch.autograd.grad(sum(totals.values()), params)
    return {t: v.detach() for t, v in totals.items()}, grads


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_stages_in_sequence_equal_the_whole_graph(programs, alignment):
    program = programs[alignment]
    ref_losses, ref_grads = _losses_and_grads(program, program.mux.gm)
    assert set(ref_losses) == {"a", "b"}
    assert all(g.norm() > 0 for g in ref_grads), "a reference grad is zero; the test is vacuous"
    for stages in (1, 2, 3, 4):
        pg = partition(program.mux, None, stages).value
        assert len(pg.stages) == stages
        losses, grads = _losses_and_grads(program, lambda *a, pg=pg: run_stages(pg, *a))
        for t in ref_losses:
            torch.testing.assert_close(losses[t], ref_losses[t], rtol=0, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        if stages != 3:
            continue
        # the split_module root runs the same stages
        losses_split, _ = _losses_and_grads(program, pg.split)
        for t in ref_losses:
            torch.testing.assert_close(losses_split[t], ref_losses[t], rtol=0, atol=0)


def test_stage_signatures_chain(mux):
    pg = partition(mux, None, 3).value
    placeholders = set(mux.input_names())
    produced: set[str] = set()
    for stage in pg.stages:
        for name in stage.inputs:
            assert name in placeholders or name in produced, (stage.index, name)
        produced |= set(stage.outputs)
    # each boundary sends exactly the values produced before it and read after it
    for comm in pg.boundaries():
        later = {n for s in pg.stages[comm.stage + 1:] for n in s.inputs}
        earlier = {n for s in pg.stages[: comm.stage + 1] for n in s.outputs}
        assert {c.name for c in comm.crossing} == later & earlier
    for i, stage in enumerate(pg.stages):
        parts = pg.stage_inputs(i)
        assert sorted(sum(parts.values(), ())) == sorted(stage.inputs)
        assert "mux" in parts["data"] and all(n in mux.tensors for n in parts["bound"])
        if i:
            assert set(parts["received"]) <= {c.name for c in pg.boundaries()[i - 1].crossing}
        assert stage.module is getattr(pg.split, f"submod_stage_{i}")
    # the exported higher-order-op body keeps its own name next to the stage modules
    hop = [m for n, m in pg.split.named_children() if "stage" not in n]
    assert any(isinstance(m, torch.fx.GraphModule) for m in hop)


def test_split_without_partition_affix(programs, monkeypatch):
    """Older torch has no ``partition_affix``: stage modules are numbered past HOP bodies."""
    import importlib

    mod = importlib.import_module("muxc.passes.partition")  # the package re-exports the function

    real = mod.split_module

    def old_split_module(m, root_m, split_callback, keep_original_node_name=False):
        return real(m, root_m, split_callback, keep_original_node_name=keep_original_node_name)

    monkeypatch.setattr(mod, "split_module", old_split_module)
    program = programs["chunk"]
    ref, _ = _losses_and_grads(program, program.mux.gm)
    pg = partition(program.mux, None, 3).value
    got, _ = _losses_and_grads(program, lambda *a: run_stages(pg, *a))
    assert all(torch.equal(got[t], ref[t]) for t in ref)


# ------------------------------------------------------------------ structure


def test_one_peft_subgraph_per_adapter_site(mux):
    pg = partition(mux, None, 1).value
    peft = pg.of_kind(SubgraphKind.PEFT)
    sites = mux.nodes_with(Role.ADAPTER)
    layers = 2
    assert len(sites) == len(mux.sites) == 4 * layers  # q (a), k (b), v (a+b), down input (b)
    assert len(peft) == len(sites)
    node = {n.name: n for n in mux.gm.graph.nodes}
    for sg in peft:
        members = [node[name] for name in sg.nodes]
        site_nodes = [n for n in members if info(n).role is Role.ADAPTER]
        gemms = [n for n in members if n.target is torch.ops.aten.linear.default]
        assert len(site_nodes) == 1 and len(gemms) == 1 and len(members) == 2, sg
        assert sg.site == info(site_nodes[0]).site
    by_site = {sg.site: sg for sg in peft}
    assert by_site["model.layers.0.self_attn.v_proj"].tasks == {"a", "b"}
    assert by_site["model.layers.0.self_attn.q_proj"].tasks == {"a"}
    assert by_site["model.layers.0.mlp.down_proj"].tasks == {"b"}
    # COMPUTE runs separate PEFT subgraphs: never two COMPUTE in a row, one COMMUNICATE per boundary
    kinds = [sg.kind for sg in pg.subgraphs]
    assert all(not (x is y is SubgraphKind.COMPUTE) for x, y in zip(kinds, kinds[1:]))
    assert pg.counts()[SubgraphKind.COMMUNICATE] == 0
    assert len(partition(mux, None, 3).value.boundaries()) == 2


def test_subgraphs_cover_every_op_once_and_record_tasks(mux):
    pg = partition(mux, None, 2).value
    ops = [n for n in mux.gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    names = [n for sg in pg.subgraphs for n in sg.nodes]
    assert sorted(names) == sorted(n.name for n in ops)
    for sg in pg.subgraphs:
        assert sg.tasks <= {"a", "b"} and sg.tasks
        assert sg.cost >= 0
        if sg.kind is SubgraphKind.PEFT:
            roles = {info(next(n for n in ops if n.name == name)).role for name in sg.nodes}
            assert roles == {Role.ADAPTER, Role.BACKBONE}
        if sg.kind is SubgraphKind.COMPUTE:
            assert all(info(n).role is not Role.ADAPTER for n in ops if n.name in set(sg.nodes))


def test_partition_ids_are_monotone_along_edges_and_losses_are_last(mux):
    for stages in (2, 4):
        pg = partition(mux, None, stages).value
        ids = partition_ids(pg)
        for node in mux.gm.graph.nodes:
            for a in node.all_input_nodes:
                if a.name in ids and node.name in ids:
                    assert ids[a.name] <= ids[node.name], (a.name, node.name)
        assert [s.index for s in pg.stages] == list(range(stages))
        assert [ids[n.name] for n in mux.nodes_with(Role.LOSS)] == [stages - 1] * 2
        # stages are contiguous runs of subgraphs, in id order
        assert [sg.stage for sg in pg.subgraphs] == sorted(sg.stage for sg in pg.subgraphs)


def test_gpt2_input_and_output_sites_on_one_base_op_form_one_peft_subgraph(bases):
    base = bases("gpt2")
    lora = make_peft(base, LoraConfig(r=2, target_modules=["c_proj"], lora_dropout=0.0), 1)
    ia3 = make_peft(base, IA3Config(target_modules=["c_fc", "c_proj"],
                                    feedforward_modules=["c_proj"]), 2)
    program = muxc.compile([muxc.Task(name="a", model=lora), muxc.Task(name="b", model=ia3)])
    mux = program.mux
    pg = partition(mux, None, 2).value
    peft = {sg.site: sg for sg in pg.of_kind(SubgraphKind.PEFT)}
    both = peft["transformer.h.0.mlp.c_proj"]
    targets = [str(next(n for n in mux.gm.graph.nodes if n.name == name).target) for name in both.nodes]
    assert sum("Site" in t for t in targets) == 2  # the IA3 input site and the LoRA output site
    assert sum("addmm" in t for t in targets) == 1  # Conv1D's GEMM with its reshapes
    assert both.tasks == {"a", "b"}
    # PEFT subgraphs = adapted base ops (c_proj of attn and mlp adapted on both sides, c_fc once)
    assert len(peft) == 3 * 2
    assert len(mux.nodes_with(Role.ADAPTER)) == 5 * 2
    ids, mask, batch = build_batch(BATCHES, mux.tasks, torch.device("cpu"), None, True)
    args = [*_bound(mux), ids, mask, batch]
    ref = mux.gm(*args)
    got = run_stages(pg, *args)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ balancing and costs


def _brute(costs, parts):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), parts - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_balance_is_optimal_contiguous_and_deterministic():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 100]) for _ in range(n)]
        parts = rng.randint(1, n)
        out = balance(costs, parts)
        assert out == sorted(out) and set(out) == set(range(parts))
        worst = max(sum(c for c, s in zip(costs, out) if s == p) for p in range(parts))
        assert worst == _brute(costs, parts), (costs, parts, out)
        assert balance(costs, parts) == out


def test_stage_costs_are_balanced(mux):
    for stages in (2, 3, 4):
        pg = partition(mux, None, stages).value
        costs = pg.stage_costs()
        items = [sg.cost for sg in pg.subgraphs if sg.kind is not SubgraphKind.COMMUNICATE]
        assert sum(costs) == pytest.approx(sum(items))
        # an optimal linear partition is within one item of the mean
        assert max(costs) <= sum(items) / stages + max(items) + 1e-6
        assert min(costs) > 0


def test_flop_cost_counts_gemms_and_attention(mux):
    cost = FlopCost(mux)
    t = cost.hint.tokens
    q = next(n for n in mux.gm.graph.nodes if n.name == "linear")  # layer 0 q_proj 32 -> 32
    assert cost(q) == 2 * t * 32 * 32
    attn = next(n for n in mux.gm.graph.nodes if "scaled_dot_product" in str(n.target))
    seq = cost.hint.seq
    assert cost(attn) == 4 * cost.hint.rows * 4 * seq * seq * 8
    views = [n for n in mux.gm.graph.nodes if str(n.target) == "aten.view.default"]
    assert views and all(cost(n) == 0 for n in views)


@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_latency_cost_from_the_cost_model_balances_seconds(programs, alignment):
    mux = programs[alignment].mux
    cost = LatencyCost(mux)
    names = {n.name for n in mux.gm.graph.nodes}
    assert set(cost.seconds) <= names
    assert cost(next(n for n in mux.gm.graph.nodes if n.name == "linear")) > 0
    pg = partition(mux, None, 3, node_cost=cost).value
    assert pg.cost_name == "s" and "s)" in repr(pg)
    assert sum(pg.stage_costs()) == pytest.approx(sum(cost.seconds.values()))
    items = [sg.cost for sg in pg.subgraphs if sg.kind is not SubgraphKind.COMMUNICATE]
    assert max(pg.stage_costs()) <= sum(items) / 3 + max(items) + 1e-12


def test_custom_node_cost_and_context_options(mux):
    pg = partition(mux, None, 2, node_cost=lambda n: 1.0).value
    sizes = [sum(len(pg.subgraphs[i].nodes) for i in s.subgraphs) for s in pg.stages]
    assert pg.stage_costs() == [float(s) for s in sizes]
    assert abs(sizes[0] - sizes[1]) <= max(len(sg.nodes) for sg in pg.subgraphs)
    result = partition(mux, CompileContext(muxc.Options(stages=3)))
    assert len(result.value.stages) == 3
    assert "3 stages" in result.notes
    assert len(partition(mux, CompileContext(muxc.Options())).value.stages) == 1


def test_partition_is_deterministic_and_leaves_mux_unchanged(mux):
    code = mux.gm.code
    metas = [dict(n.meta) for n in mux.gm.graph.nodes]
    a = partition(mux, None, 3).value
    b = partition(mux, None, 3).value
    assert a.subgraphs == b.subgraphs
    assert a.table() == b.table()
    assert partitioned_dot(a) == partitioned_dot(b)
    assert mux.gm.code == code
    assert [dict(n.meta) for n in mux.gm.graph.nodes] == metas
    assert not any(hasattr(n, "_fx_partition") for n in mux.gm.graph.nodes)


def test_communicate_records_crossing_tensors(mux):
    pg = partition(mux, None, 2).value
    (comm,) = pg.boundaries()
    assert comm.nodes == () and comm.cost == 0 and (comm.stage, comm.dst_stage) == (0, 1)
    by_name = {c.name: c for c in comm.crossing}
    hidden = [c for c in comm.crossing if c.dtype == "float32" and c.shape.endswith(", 32)")
              and c.shape.count("s") == 2]
    assert hidden and all(c.bytes_per_token == 32 * 4 for c in hidden)  # one fp32 hidden state / token
    sizes = [c for c in by_name.values() if c.shape == "scalar"]
    assert sizes, "symbolic sizes (sym_size) used by later views must cross too"
    assert comm.bytes_per_token == sum(c.bytes_per_token for c in comm.crossing)


@pytest.mark.parametrize("stages", [0, -1, 10_000, "2", True])
def test_bad_stage_counts_raise_with_values_and_remedy(mux, stages):
    with pytest.raises(OptionsError, match=r"stages") as e:
        partition(mux, None, stages)
    if isinstance(stages, int) and not isinstance(stages, bool):
        assert f"stages={stages}" in str(e.value) and "1 <= stages <=" in str(e.value)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_node_costs_are_rejected(mux, bad):
    with pytest.raises(OptionsError, match="costs must be finite and >= 0"):
        partition(mux, None, 2, node_cost=lambda n: bad)


# ------------------------------------------------------------------ text and dot


def test_table_and_repr(mux):
    pg = partition(mux, None, 2).value
    assert isinstance(pg, PartitionedGraph)
    r = repr(pg)
    assert r.startswith("PartitionedGraph(llama, 2 stages,") and "8 peft" in r and "1 communicate" in r
    text = pg.table()
    lines = text.splitlines()
    assert any(line.startswith("id ") and "kind" in line and "first" in line for line in lines)
    assert sum(" peft " in line for line in lines) == 8
    assert "B/token" in text and "model.layers.1.mlp.down_proj" in text


def test_dot_has_a_cluster_per_stage_and_a_box_per_subgraph(mux, tmp_path):
    pg = partition(mux, None, 3).value
    text = partitioned_dot(pg)
    assert text.startswith("digraph partitioned {") and text.rstrip().endswith("}")
    assert text.count("subgraph cluster_stage_") == 3
    for sg in pg.subgraphs:
        assert text.count(f"  sg{sg.id} [label=") == 1
    assert text.count("#f9cb9c") == len(pg.of_kind(SubgraphKind.PEFT))
    assert text.count("shape=cds") == 2
    edges = pg.edges()
    assert text.count(" -> ") == len(edges)
    comm = {sg.id for sg in pg.boundaries()}
    for a, b in edges:  # cross-stage flows go through the boundary records
        sa, sb = pg.subgraphs[a], pg.subgraphs[b]
        assert sa.stage == sb.stage or a in comm or b in comm
    path = write_dot(pg, tmp_path / "sub" / "p.dot")
    assert path.read_text() == text


def test_render_without_graphviz_says_how_to_install(mux, tmp_path):
    pg = partition(mux, None, 2).value
    with pytest.raises(GraphvizNotFoundError, match="install Graphviz"):
        render(pg, tmp_path / "p.png", dot="muxc-no-such-dot-binary")
    assert render(pg, tmp_path / "p.dot", dot="muxc-no-such-dot-binary").read_text() == partitioned_dot(pg)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_render_png_with_graphviz(mux, tmp_path):
    out = render(partition(mux, None, 2).value, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
