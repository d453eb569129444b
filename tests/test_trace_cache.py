"""Trace once per structure: equal-structure tasks share one export, re-bound to their tensors,
within a compile and, through the process-wide template store, across compiles."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated
from models import make_batch, make_peft, perturb
from peft import IA3Config, LoraConfig

import muxc
from muxc.frontends import TraceCache, trace_signature, trace_task
from muxc.frontends import cache as cache_module
from muxc.ir import TaskGraph, info

QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture
def exports(monkeypatch, fresh_templates):
    """Counts calls of torch.export.export (the class of each exported model, in order), from
    an empty process-wide template store."""
    calls = []
    real = torch.export.export

    def counting(mod, *args, **kwargs):
        calls.append(type(mod.m).__name__)
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def _lora(family: str, r: int = 4, alpha: int = 8, targets=None) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or QV[family], lora_dropout=0.0)


def assert_same_graph(got: TaskGraph, want: TaskGraph) -> None:
    """``got`` is node for node ``want`` (names, ops, arguments, records, meta keys, code) and
    binds every placeholder to the very same tensor."""
    a, b = list(got.gm.graph.nodes), list(want.gm.graph.nodes)
    assert [n.name for n in a] == [n.name for n in b]
    for x, y in zip(a, b):
        assert (x.op, x.target) == (y.op, y.target), x.format_node()
        assert str(x.args) == str(y.args) and str(x.kwargs) == str(y.kwargs), x.format_node()
        assert info(x) == info(y), x.format_node()
        assert set(x.meta) == set(y.meta), x.format_node()
        val_x, val_y = x.meta.get("val"), y.meta.get("val")
        if isinstance(val_y, torch.Tensor):
            assert (str(val_x.shape), val_x.dtype) == (str(val_y.shape), val_y.dtype), x.format_node()
    assert got.gm.code == want.gm.code
    assert got.bindings == want.bindings
    for ph, binding in want.bindings.items():
        assert got.bindings[ph].tensor is binding.tensor, ph
    assert got.adapters == want.adapters
    assert [r.params for r in got.adapters] == [r.params for r in want.adapters]


def _second_structure(family: str):
    """llama: IA3 (another kind); gpt2: LoRA that differs from `_lora` only in its rank."""
    return IA3Config() if family == "llama" else _lora(family, r=8)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_four_tasks_two_structures_export_twice_and_match_isolated(bases, family, exports):
    base = bases(family)
    spec = [
        ("one_a", make_peft(base, _lora(family), 1)),
        ("two_a", make_peft(base, _second_structure(family), 2)),
        ("one_b", make_peft(base, _lora(family), 3)),
        ("two_b", make_peft(base, _second_structure(family), 4)),
    ]
    batches = {name: make_batch(2, 5 + i, i) for i, (name, _) in enumerate(spec)}
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec], muxc.Options(verify=True))
    assert len(exports) == 2
    trace = next(r for r in program.history if r.name == "trace_tasks")
    assert trace.summary.startswith("2 exported, 2 re-bound to an equal-structure export")
    assert "export of 'one_a'" in trace.summary and "export of 'two_a'" in trace.summary
    # the dump tables each export once; a re-bound graph points at its source's table
    assert trace.text.count("\nname ") == 2 and "(the rows of 'one_a'" in trace.text
    losses = program.forward_backward(batches)
    models = dict(spec)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)


def test_rebound_graph_is_what_its_own_export_gives(bases, exports):
    base = bases("llama")
    first, second = make_peft(base, _lora("llama", targets="all-linear"), 1), make_peft(
        base, _lora("llama", targets="all-linear"), 2)
    cache = TraceCache()
    cache.trace(muxc.Task(name="a", model=first), True)
    task = muxc.Task(name="b", model=second)
    got = cache.trace(task, True)
    assert (cache.exported, cache.reused, len(exports)) == (["a"], {"b": "a"}, 1)
    assert got.reused_from == "a"
    assert_same_graph(got, trace_task(task, True))
    # the frozen weights are b's own (separate copies of one base), not a's
    frozen = [b.tensor for b in got.frozen_bindings().values()]
    mine = {id(p) for p in second.parameters()} | {id(t) for t in second.buffers()}
    assert frozen and all(id(t) in mine for t in frozen)


def test_adapters_of_one_model_share_an_export_and_match_isolated(bases, monkeypatch, exports):
    model = make_peft(bases("llama"), _lora("llama", targets="all-linear"), 1)
    model.add_adapter("second", _lora("llama", targets="all-linear"))
    model.add_adapter("third", _lora("llama", targets="all-linear"))
    model.add_adapter("rank2", _lora("llama", r=2, targets="all-linear"))  # another structure
    perturb(model, 5)
    names = {"first": "default", "second": "second", "third": "third", "rank2": "rank2"}
    batches = {name: make_batch(2, 4 + i, i) for i, name in enumerate(names)}
    refs = {name: isolated(model, batches[name], adapter) for name, adapter in names.items()}
    model.set_adapter("default")
    tasks = [muxc.Task(name=n, model=model, adapter_name=a) for n, a in names.items()]
    graphs = {}
    real = TraceCache.trace

    def keeping(self, task, with_positions):
        graphs[task.name] = real(self, task, with_positions)
        return graphs[task.name]

    monkeypatch.setattr(TraceCache, "trace", keeping)
    program = muxc.compile(tasks, muxc.Options(verify=True))
    assert len(exports) == 2
    assert {t: g.reused_from for t, g in graphs.items()} == {
        "first": None, "second": "first", "third": "first", "rank2": None}
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: adapter_grads(model, names[n]), refs)
    # the third adapter's nodes read its own parameters, exactly as its own export does
    assert_same_graph(graphs["third"], trace_task(tasks[2]))


@pytest.mark.parametrize(
    "other",
    [dict(r=8), dict(alpha=16), dict(targets=["q_proj", "k_proj"])],
    ids=["rank", "alpha", "targets"],
)
def test_tasks_differing_in_rank_alpha_or_targets_have_other_signatures(bases, other):
    base = bases("llama")
    a = muxc.Task(name="a", model=make_peft(base, _lora("llama"), 1))
    b = muxc.Task(name="b", model=make_peft(base, _lora("llama", **other), 2))
    assert trace_signature(a, False) != trace_signature(b, False)  # so never re-bound


def test_signature_sees_dtype_positions_and_module_flags(bases):
    base = bases("llama")
    a = muxc.Task(name="a", model=make_peft(base, _lora("llama"), 1))
    b = muxc.Task(name="b", model=make_peft(base, _lora("llama"), 2))
    assert trace_signature(a, False) == trace_signature(b, False)
    assert trace_signature(a, False) != trace_signature(a, True)
    half = muxc.Task(name="h", model=make_peft(base, _lora("llama"), 1).to(torch.bfloat16))
    assert trace_signature(a, False) != trace_signature(half, False)
    b.model.get_base_model().gradient_checkpointing_enable()
    assert trace_signature(a, False) != trace_signature(b, False)
    # the training flag is not part of it: a trace always runs in training mode
    b2 = muxc.Task(name="b2", model=make_peft(base, _lora("llama"), 2).eval())
    assert trace_signature(a, False) == trace_signature(b2, False)


def test_signature_digest_tells_apart_what_equality_would():
    """The digest that stands for a signature's large parts: equal values digest alike; a
    change of value, type or nesting does not; code objects count by value, in order."""
    from muxc.frontends.signature import _Digest

    def f():
        return 1

    def g():
        return 2

    def digest(v):
        d = _Digest().add(v)
        return d.bytes(), tuple(d.codes)

    value = ("dict", (("'a'", 1), ("'b'", (0.5, None, "x")), ("'f'", f.__code__)))
    assert digest(value) == digest(tuple(value))
    assert digest(value)[1] == (f.__code__,)
    others = [("dict", (("'a'", 1.0), ("'b'", (0.5, None, "x")), ("'f'", f.__code__))),
              ("dict", (("'a'", True), ("'b'", (0.5, None, "x")), ("'f'", f.__code__))),
              ("dict", (("'a'", 1), ("'b'", (0.5, None, "x", None)), ("'f'", f.__code__))),
              ("dict", (("'a'", 1), ("'b'", (0.5, (None, "x"))), ("'f'", f.__code__))),
              ("dict", (("'a'", 1), ("'b'", (0.5, None, "xy")), ("'f'", f.__code__)))]
    assert len({digest(v)[0] for v in [value, *others]}) == 1 + len(others)
    swapped = ("dict", (("'a'", 1), ("'b'", (0.5, None, "x")), ("'f'", g.__code__)))
    assert digest(swapped)[0] == digest(value)[0] and digest(swapped)[1] != digest(value)[1]


def test_export_with_a_tensor_it_cannot_find_again_is_not_shared(bases, monkeypatch, exports):
    base = bases("llama")
    real = cache_module.lifted_tensors

    def losing_one(hf, targets, *rest):  # as if the trace had made a constant (no FQN in the model)
        found = real(hf, targets, *rest)
        found[next(iter(found))] = None
        return found

    monkeypatch.setattr(cache_module, "lifted_tensors", losing_one)
    cache = TraceCache()
    for i in range(2):
        cache.trace(muxc.Task(name=f"t{i}", model=make_peft(base, _lora("llama"), i)), False)
    assert (cache.exported, cache.reused, len(exports)) == (["t0", "t1"], {}, 2)
    assert "not a tensor of the model" in cache.summary()


def test_compiled_program_keeps_no_task_graph_only_a_template_per_structure(
        bases, monkeypatch, fresh_templates):
    base = bases("llama")
    alive = []
    real = TraceCache.trace

    def tracking(self, task, with_positions):
        tg = real(self, task, with_positions)
        alive.append((weakref.ref(tg), weakref.ref(tg.gm)))
        return tg

    monkeypatch.setattr(TraceCache, "trace", tracking)
    tasks = [muxc.Task(name=f"t{i}", model=make_peft(base, _lora("llama"), i)) for i in range(3)]
    program = muxc.compile(tasks)
    gc.collect()
    assert len(alive) == 3
    assert all(tg() is None for tg, _ in alive)
    # the structure's template is a private copy of t0's export (its graph, bound to no
    # tensor): t0's own graph module, which the later passes received, is gone like t1's and t2's
    assert [gm() is not None for _, gm in alive] == [False, False, False]
    (_, template), = program.exports.items()
    assert template.graph.adapters == [] and all(b.tensor is None for b in template.graph.bindings.values())
    # the process-wide store holds that same template (one graph per structure in memory)
    (_, stored), = fresh_templates.items()
    assert stored.graph.gm is template.graph.gm
    assert {t: len(recs) for t, recs in program.mux.adapters.items()} == {"t0": 4, "t1": 4, "t2": 4}


def test_rebound_head_without_bias_keeps_its_empty_bias_slot(bases, exports):
    """A Llama SEQ_CLS head (``score`` has no bias): the re-bound head node still reads
    (hidden, weight, None, site), as its own export does (a re-bind once shifted the site into
    the bias slot, which broke `Program.add_task` next to such a task)."""
    import copy

    import transformers

    base = bases("llama")
    cfg = copy.deepcopy(base.config)
    cfg.num_labels, cfg.pad_token_id = 2, 0
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cls = transformers.LlamaForSequenceClassification(cfg)
        cls.model.load_state_dict(base.model.state_dict())
        models.append(make_peft(cls.eval(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"],
                                                       lora_dropout=0.0), seed, copy_base=False))
    cache = TraceCache()
    cache.trace(muxc.Task(name="a", model=models[0]), True)
    task = muxc.Task(name="b", model=models[1])
    got = cache.trace(task, True)
    assert got.reused_from == "a" and len(exports) == 1
    [head] = [n for n in got.gm.graph.nodes if n.target is torch.ops.muxc.task_head.default]
    assert head.args[2] is None and isinstance(head.args[3], str)
    assert_same_graph(got, trace_task(task, True))


# --- the process-wide template store: across compiles of one process ---


def _batches(names):
    return {name: make_batch(2, 5 + i, i) for i, name in enumerate(names)}


def test_two_compiles_of_one_structure_export_once_and_match_isolated(bases, exports):
    """A second `muxc.compile` of a known structure re-binds the stored template: no export,
    and exactly (bit for bit) what a compile that exports gives, within 1e-4 of HF PEFT."""
    base = bases("llama")
    first = {"a": make_peft(base, _lora("llama"), 1)}
    second = {"b": make_peft(base, _lora("llama"), 2), "c": make_peft(base, _lora("llama"), 3)}
    batches = _batches(["a", "b", "c"])
    refs = {n: isolated(m, batches[n]) for n, m in {**first, **second}.items()}
    grads = lambda models: lambda n: adapter_grads(models[n], "default")  # noqa: E731
    one = muxc.compile([muxc.Task(name="a", model=first["a"])], muxc.Options(verify=True))
    assert len(exports) == 1 and len(one.exports) == 1
    two = muxc.compile([muxc.Task(name=n, model=m) for n, m in second.items()], muxc.Options(verify=True))
    assert len(exports) == 1  # nothing exported: b and c re-bind a's stored template
    summary = next(r for r in two.history if r.name == "trace_tasks").summary
    assert summary.startswith("0 exported, 2 re-bound to an equal-structure export (1 structure(s) "
                              "from the process-wide store")
    assert_matches(one.forward_backward({"a": batches["a"]}), grads(first), {"a": refs["a"]})
    got = two.forward_backward({n: batches[n] for n in second})
    assert_matches(got, grads(second), {n: refs[n] for n in second})
    got_grads = {n: adapter_grads(m, "default") for n, m in second.items()}
    # the same compile with the store off exports b and gives the very same numbers
    twins = {n: make_peft(base, _lora("llama"), seed) for n, seed in (("b", 2), ("c", 3))}
    size = cache_module.shared_templates().info().max_structures
    cache_module.set_shared_templates_size(0)
    try:
        alone = muxc.compile([muxc.Task(name=n, model=m) for n, m in twins.items()])
    finally:
        cache_module.set_shared_templates_size(size)
    assert len(exports) == 2
    want = alone.forward_backward({n: batches[n] for n in twins})
    assert all(torch.equal(got[n], want[n]) for n in second)
    for n, m in twins.items():
        assert same_tensors(got_grads[n], adapter_grads(m, "default")), n


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_attention_implementation_rank_or_store_off_misses(bases, exports, monkeypatch):
    """Only an equal `TraceSignature` hits the store: eager attention (same weights) and another
    rank are exported anew; an equal structure in a third compile hits; ``shared=None`` and a
    cleared store miss."""
    import copy

    base = bases("llama")
    eager_base = copy.deepcopy(base)
    eager_base.config._attn_implementation = "eager"
    cache = TraceCache()
    cache.trace(muxc.Task(name="sdpa", model=make_peft(base, _lora("llama"), 1)), False)
    eager = muxc.Task(name="eager", model=make_peft(eager_base, _lora("llama"), 1))
    rank8 = muxc.Task(name="rank8", model=make_peft(base, _lora("llama", r=8), 1))
    for task in (eager, rank8):  # each its own compile
        later = TraceCache()
        later.trace(task, False)
        assert (later.exported, later.from_store) == ([task.name], {})
    assert len(exports) == 3 and len(cache_module.shared_templates()) == 3
    hit = TraceCache()
    got = hit.trace(muxc.Task(name="again", model=make_peft(base, _lora("llama"), 2)), False)
    assert (hit.exported, hit.from_store, hit.reused) == ([], {"again": "sdpa"}, {"again": "sdpa"})
    assert len(exports) == 3 and got.reused_from is None  # tabled as its compile's own graph
    size = cache_module.shared_templates().info().max_structures
    assert "from the process-wide store" in hit.summary() and f"template store: 3/{size} " in hit.summary()
    # shared=None ignores the store; clearing it empties it
    off = TraceCache(shared=None)
    off.trace(muxc.Task(name="off", model=make_peft(base, _lora("llama"), 3)), False)
    assert off.exported == ["off"] and len(exports) == 4 and "template store" not in off.summary()
    assert cache_module.clear_shared_templates() == 3 and len(cache_module.shared_templates()) == 0
    cleared = TraceCache()
    cleared.trace(muxc.Task(name="cleared", model=make_peft(base, _lora("llama"), 4)), False)
    assert cleared.exported == ["cleared"] and len(exports) == 5


def test_store_drops_least_recently_used_and_turns_off(bases, fresh_templates):
    """The store's bound: resizing drops the least recently used structures; 0 turns it off."""
    base = bases("llama")
    cache = TraceCache()
    for name, cfg in (("r4", _lora("llama")), ("r8", _lora("llama", r=8))):
        cache.trace(muxc.Task(name=name, model=make_peft(base, cfg, 1)), False)
    (sig4, t4), (sig8, t8) = fresh_templates.items()
    assert (t4.graph.task, t8.graph.task) == ("r4", "r8")
    assert fresh_templates.get(sig4) is t4  # r4 is now the most recently used
    size = fresh_templates.info().max_structures
    try:
        fresh_templates.resize(1)
        assert [t.graph.task for _, t in fresh_templates.items()] == ["r4"]
        info = fresh_templates.info()
        assert (info.structures, info.max_structures, info.evicted, info.hits) == (1, 1, 1, 1)
        assert info.nodes == len(t4.graph.gm.graph.nodes) + sum(
            len(m.graph.nodes) for n, m in t4.graph.gm.named_modules() if n and hasattr(m, "graph"))
        fresh_templates.resize(0)
        assert len(fresh_templates) == 0 and str(fresh_templates.info()) == "template store off"
        fresh_templates.put(sig8, t8)
        assert len(fresh_templates) == 0  # off: keeps nothing
        with pytest.raises(ValueError, match="max_structures"):
            fresh_templates.resize(-1)
    finally:
        fresh_templates.resize(size)


def test_a_stored_template_is_not_changed_by_compiling_and_binds_no_tensor(bases, fresh_templates):
    """Compiling (all passes) over graphs re-bound from a stored template leaves the template as
    it was: its nodes, their meta entries and its bodies are the template's own."""
    base = bases("llama")
    muxc.compile([muxc.Task(name="a", model=make_peft(base, _lora("llama"), 1))])
    (_, template), = fresh_templates.items()

    def snapshot(gm):
        return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), dict(n.meta))
                for m in gm.modules() if hasattr(m, "graph") for n in m.graph.nodes]

    before = snapshot(template.graph.gm)
    bodies = {id(m) for n, m in template.graph.gm.named_modules() if n}
    graphs = []
    real = TraceCache.trace

    def keeping(self, task, with_positions):
        graphs.append(real(self, task, with_positions))
        return graphs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TraceCache, "trace", keeping)
        program = muxc.compile([muxc.Task(name=n, model=make_peft(base, _lora("llama"), i))
                                for i, n in enumerate(["b", "c"], start=2)], muxc.Options(verify=True))
    assert [g.task for g in graphs] == ["b", "c"]
    after = snapshot(template.graph.gm)
    assert [x[:5] for x in after] == [x[:5] for x in before]
    assert all(x[5] == y[5] and all(x[5][k] is y[5][k] for k in x[5]) for x, y in zip(after, before))
    for g in graphs:  # every re-bound graph owns its nodes and bodies
        assert not {id(m) for n, m in g.gm.named_modules() if n} & bodies
        assert not {id(n.meta) for n in g.gm.graph.nodes} & {id(n.meta) for n in template.graph.gm.graph.nodes}
    assert all(b.tensor is None for b in template.graph.bindings.values()) and template.graph.adapters == []
    assert program.mux is not None


def test_signature_sees_code_and_process_state(bases, monkeypatch):
    """What the store's key adds for cross-compile use: a module class's ``forward`` patched, a
    closure capturing another value, the default dtype, grad mode."""
    base = bases("llama")
    a = muxc.Task(name="a", model=make_peft(base, _lora("llama"), 1))
    sig = trace_signature(a, False)
    assert trace_signature(a, False) == sig
    mlp = type(base.model.layers[0].mlp)
    real_forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda self, x: real_forward(self, x))
    assert trace_signature(a, False) != sig
    monkeypatch.setattr(mlp, "forward", real_forward)
    assert trace_signature(a, False) == sig

    def scaled(k):
        def hook(module, args, out):
            return out * k
        return hook

    layer = a.model.get_base_model().model.layers[0].mlp
    handle = layer.register_forward_hook(scaled(2.0))
    with2 = trace_signature(a, False)
    handle.remove()
    handle = layer.register_forward_hook(scaled(3.0))
    assert trace_signature(a, False) != with2
    handle.remove()
    with torch.no_grad():
        assert trace_signature(a, False) != sig
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert trace_signature(a, False) != sig
    finally:
        torch.set_default_dtype(old)
    assert trace_signature(a, False) == sig


def test_export_reads_only_what_the_signature_keys():
    """A tripwire: the store's key is complete for `export_task`'s inputs (a task, whether
    positions are traced); a new input must join `TraceSignature` first."""
    import inspect

    from muxc.frontends.export import export_task

    assert list(inspect.signature(export_task).parameters) == ["task", "with_positions"]
