"""What torch.export leaves behind is freed (`muxc.frontends.release`): a dropped program or
export takes its shape environments, fake modes and fake tensors with it, and the program
trains exactly as before."""

from __future__ import annotations

import gc
import linecache
import weakref

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated
from models import build_base, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.frontends.export import export_task
from muxc.frontends.garbage import collect_young, young_garbage
from muxc.frontends.release import (
    UNREAD_META,
    drop_unread_meta,
    fake_modes,
    forget_generated_code,
    forget_source_lines,
    generated_code_keys,
    release_export_state,
    share_module_stacks,
)


@pytest.fixture(scope="module")
def base():
    return build_base("llama")


def _lora(seed: int, base, r: int = 4):
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return make_peft(base, cfg, seed=seed)


def _ia3(seed: int, base):
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                    feedforward_modules=["down_proj"])
    return make_peft(base, cfg, seed=seed)


def _export_state(gms) -> list[weakref.ref]:
    """Weak references to the shape environments and fake modes behind ``gms``' fake tensors."""
    modes = fake_modes(gms)
    assert modes, "the graphs hold no fake tensors: nothing to check"
    return [weakref.ref(m) for m in modes] + [weakref.ref(m.shape_env) for m in modes]


def _graphs(program: muxc.Program) -> list:
    return [program.mux.gm] + [e.graph.gm for _, e in program.exports.items()]


def test_dropped_export_frees_its_shape_env(base):
    exp = export_task(muxc.Task(name="a", model=_lora(1, base)), with_positions=False)
    refs = _export_state([exp.graph.gm])
    assert len(refs) == 2  # one fake mode, one shape env
    from torch.fx.experimental import proxy_tensor

    assert not proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT  # the pre-dispatch graph
    del exp
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_dropped_program_frees_every_export(base, fresh_templates):
    """Two structures (two exports), one re-bound task; then a task joins and one leaves: once
    the program and the template store are dropped, no shape env of any of it is alive."""
    models = {"a": _lora(1, base), "b": _ia3(2, base), "c": _lora(3, base),
              "d": _lora(4, base, r=8)}
    program = muxc.compile([muxc.Task(name=n, model=models[n]) for n in "abc"])
    trace = next(r for r in program.history if r.name == "trace_tasks")
    assert trace.summary.startswith("2 exported, 1 re-bound")
    refs = _export_state(_graphs(program))
    program.add_task(muxc.Task(name="d", model=models["d"]))  # a third structure: exported
    program.remove_task("a")
    refs += _export_state(_graphs(program))
    assert len({id(r()) for r in refs}) == 6  # three exports: three fake modes, three envs
    del program
    fresh_templates.clear()
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_program_after_release_is_exact(base, fresh_templates):
    """Released caches refill on demand: a program whose exports' caches were emptied (during
    the compile, and again here) computes each task's loss and adapter grads as HF PEFT alone."""
    models = {"a": _lora(5, base), "b": _ia3(6, base)}
    batches = {n: make_batch(3, 9, seed=i) for i, n in enumerate(models)}
    refs = {n: isolated(m, batches[n]) for n, m in models.items()}
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()])
    assert release_export_state(_graphs(program)) == 2
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)


def test_export_drops_unread_meta_only(base):
    gm = export_task(muxc.Task(name="a", model=_lora(1, base)), with_positions=False).graph.gm
    keys = {k for n in gm.graph.nodes for k in n.meta}
    assert not keys & set(UNREAD_META)
    assert {"val", "nn_module_stack", "muxc"} <= keys
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["stack_trace"] = "File x"
    node.meta["kept"] = 1
    assert drop_unread_meta(gm) == 1
    assert "stack_trace" not in node.meta and node.meta["kept"] == 1


def test_export_shares_equal_module_stacks(base):
    """Nodes of one module hold one ``nn_module_stack`` dict after export, with the same
    content as torch.export gave each of them (a fresh export's copies, compared)."""
    gm = export_task(muxc.Task(name="a", model=_lora(1, base)), with_positions=False).graph.gm
    stacks = [n.meta["nn_module_stack"] for n in gm.graph.nodes if "nn_module_stack" in n.meta]
    distinct = {id(s) for s in stacks}
    assert len(stacks) > 2 * len(distinct)  # shared: many nodes per module
    assert len(distinct) == len({tuple(s.items()) for s in stacks})  # equal ones only
    copies = {n.name: dict(n.meta["nn_module_stack"]) for n in gm.graph.nodes
              if "nn_module_stack" in n.meta}
    for n in gm.graph.nodes:  # undo the sharing: every node its own copy, as exported
        if n.name in copies:
            n.meta["nn_module_stack"] = dict(copies[n.name])
    assert share_module_stacks(gm) == len(distinct)
    assert {n.name: n.meta["nn_module_stack"] for n in gm.graph.nodes if n.name in copies} == copies


def test_forget_source_lines_drops_only_files_read_inside(tmp_path):
    before, inside = tmp_path / "before.py", tmp_path / "inside.py"
    before.write_text("a = 1\n")
    inside.write_text("b = 2\n")
    linecache.getlines(str(before))
    with forget_source_lines():
        assert linecache.getlines(str(inside)) == ["b = 2\n"]
        linecache.cache["<generated>"] = (6, None, ["c = 3\n"], "<generated>")  # not a file
    assert str(inside) not in linecache.cache
    assert str(before) in linecache.cache and "<generated>" in linecache.cache
    assert linecache.getlines(str(inside)) == ["b = 2\n"]  # read again on demand
    linecache.cache.pop("<generated>")


def test_release_without_fake_tensors_is_a_no_op():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert release_export_state(gm) == 0


def test_forget_generated_code_keeps_the_kept_modules_source():
    before = generated_code_keys()
    kept = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    dropped = torch.fx.symbolic_trace(torch.nn.ReLU())
    made = generated_code_keys() - before
    assert len(made) == 2
    assert forget_generated_code(before, [kept]) == 1
    assert generated_code_keys() - before == {type(kept).forward.__code__.co_filename}
    x = torch.randn(3, 2)
    assert torch.equal(dropped(x), torch.relu(x))  # its compiled code runs as before
    assert linecache.getlines(type(kept).forward.__code__.co_filename)  # source still there


def test_compile_keeps_no_generated_source_of_modules_it_dropped(base, fresh_templates):
    before = generated_code_keys()
    program = muxc.compile([muxc.Task(name="a", model=_lora(7, base))])
    made = generated_code_keys() - before
    # an export alone makes ~35 graph modules; what stays is the program's own
    assert 0 < len(made) <= 12, sorted(made)
    del program


class _Cycle:
    def __init__(self):
        self.me = self


def test_young_garbage_collects_cycles_made_inside_and_unfreezes():
    """Inside `young_garbage` a dropped reference cycle made in the block is freed by
    `collect_young` (the objects from before are frozen, not walked); nested blocks freeze
    once; the outermost exit unfreezes. With a heap the process froze itself: hands off."""
    assert gc.get_freeze_count() == 0
    before = _Cycle()
    with young_garbage():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        c = _Cycle()
        ref = weakref.ref(c)
        del c
        assert ref() is not None  # a cycle: not freed by reference counting
        with young_garbage():  # nested: nothing more frozen, still collecting
            assert gc.get_freeze_count() == frozen
            assert collect_young() >= 1 and ref() is None
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0 and before.me is before
    gc.freeze()  # the process's own frozen objects: young_garbage leaves them alone
    try:
        n = gc.get_freeze_count()
        with young_garbage():
            c = _Cycle()
            ref = weakref.ref(c)
            del c
            assert collect_young() == 0 and ref() is not None
            assert 0 < gc.get_freeze_count() <= n  # nothing more frozen (dropped ones leave)
        assert 0 < gc.get_freeze_count() <= n  # and nothing unfrozen
    finally:
        gc.unfreeze()
    gc.collect()
    assert ref() is None
