"""Program.add_task / remove_task: tasks come and go; every task trains as it would alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated, rel_err
from models import build_base, make_batch, make_peft, perturb
from peft import IA3Config, LoraConfig

import muxc

CONFIGS = {
    "a": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1, 1e-2),
    "b": (LoraConfig(r=8, target_modules=["up_proj", "o_proj"], lora_dropout=0.0), 2, 2e-2),
    "c": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 3, 5e-2),
    "d": (LoraConfig(r=2, target_modules=["k_proj", "gate_proj"], lora_dropout=0.0), 4, 1e-2),
    # the structure of "a" (its own weights and learning rate): re-bound, never exported
    "e": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 5, 3e-2),
}
SHAPES = {"a": (2, 6), "b": (3, 9), "c": (1, 6), "d": (2, 8), "e": (3, 5)}


@pytest.fixture
def exports(monkeypatch, fresh_templates):
    """Counts calls of torch.export.export (every trace of a task goes through it), from an
    empty process-wide template store."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def _batch(name: str, step: int) -> dict:
    rows, seq = SHAPES[name]
    return make_batch(rows, seq, 10 * step + ord(name))


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_add_then_remove_equals_isolated_training(llama, exports):
    models = {n: make_peft(llama, cfg, seed) for n, (cfg, seed, _) in CONFIGS.items()}
    alone = {n: copy.deepcopy(m) for n, m in models.items()}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=CONFIGS[n][2])
            for n, m in alone.items()}
    trained = {n: 0 for n in models}

    def reference_step(names, step):
        for n in names:
            alone[n](**_batch(n, step)).loss.backward()
            opts[n].step()
            opts[n].zero_grad()
            trained[n] += 1

    program = muxc.compile([muxc.Task(name=n, model=models[n], lr=CONFIGS[n][2]) for n in "abc"])
    assert len(exports) == 3  # three structures
    schedule = {1: "abc", 2: "abc", 3: "abcde", 4: "acde"}
    for step, names in schedule.items():
        if step == 3:  # d and e join after step 2: the others' optimizers keep their state
            kept = {n: program.states[n] for n in "abc"}
            program.add_task(muxc.Task(name="d", model=models["d"], lr=CONFIGS["d"][2]))
            assert len(exports) == 4  # d's structure is new: traced once; a, b, c re-bound
            assert all(program.states[n] is kept[n] and kept[n].steps == 2 for n in "abc")
            assert [r.name for r in program.history][1] == "trace_tasks"
            assert program.history[1].summary.startswith("1 exported, 3 re-bound")
            program.add_task(muxc.Task(name="e", model=models["e"], lr=CONFIGS["e"][2]))
            assert len(exports) == 4  # e has a's structure: re-bound from its kept template
            assert program.history[1].summary.startswith("0 exported, 5 re-bound")
            assert all(program.states[n] is kept[n] for n in "abc")
        if step == 4:  # b leaves after step 3
            program.remove_task("b")
            assert len(exports) == 4  # nothing traced
            assert list(program.tasks) == ["a", "c", "d", "e"] and list(program.mux.tasks) == ["a", "c", "d", "e"]
            assert len(program.exports) == 3  # b's structure is no longer kept
        program.step({n: _batch(n, step) for n in names})
        reference_step(names, step)
    assert trained == {"a": 4, "b": 3, "c": 4, "d": 2, "e": 2}
    assert {n: s.steps for n, s in program.states.items()} == {"a": 4, "c": 4, "d": 2, "e": 2}
    for n, m in models.items():
        got, want = _adapters(m), _adapters(alone[n])
        start = _adapters(make_peft(llama, CONFIGS[n][0], CONFIGS[n][1]))
        assert got.keys() == want.keys() and got
        for k in want:
            assert not torch.equal(want[k], start[k]), k  # it did train
            assert rel_err(got[k], want[k]) <= 1e-4, (n, k)
    # frozen weights still shared once: the new task's copy was re-pointed at the program's
    ptrs = {models[n].get_base_model().model.layers[0].mlp.up_proj.weight.data_ptr() for n in "acde"}
    assert len(ptrs) == 1


def test_add_task_refusals_leave_program_unchanged(llama):
    program = muxc.compile([muxc.Task(name="a", model=make_peft(llama, CONFIGS["a"][0], 1))])
    before = (program.mux, dict(program.states), list(program.tasks), program.exports)
    other_base = build_base("llama", seed=5)
    with pytest.raises(muxc.BaseWeightMismatchError, match="differs between tasks 'a' and 'x'"):
        program.add_task(muxc.Task(name="x", model=make_peft(other_base, CONFIGS["b"][0], 2)))
    with pytest.raises(muxc.TaskSpecError, match="duplicate task names"):
        program.add_task(muxc.Task(name="a", model=make_peft(llama, CONFIGS["b"][0], 2)))
    with pytest.raises(muxc.TaskSpecError, match="unknown task 'zz'"):
        program.remove_task("zz")
    with pytest.raises(muxc.TaskSpecError, match="only task"):
        program.remove_task("a")
    assert (program.mux, dict(program.states), list(program.tasks), program.exports) == before


def test_kept_trace_templates_bind_no_tensor_and_adapters_of_one_model_are_not_traced_again(
        llama, exports):
    model = make_peft(llama, CONFIGS["a"][0], 1)
    model.add_adapter("second", CONFIGS["a"][0])  # inactive: PEFT leaves it requires_grad=False
    model.add_adapter("third", CONFIGS["a"][0])
    perturb(model, 3)
    batch = _batch("a", 1)
    want = {"two": isolated(model, batch, "second"), "three": isolated(model, batch, "third")}
    model.set_adapter("default")
    program = muxc.compile([muxc.Task(name="one", model=model),
                            muxc.Task(name="two", model=model, adapter_name="second")])
    assert len(exports) == 1 and len(program.exports) == 1
    for _, template in program.exports.items():
        assert template.graph.adapters == []
        assert all(b.tensor is None for b in template.graph.bindings.values())
    # compiling turned every adapter's requires_grad on; the structure is still the same
    program.add_task(muxc.Task(name="three", model=model, adapter_name="third"))
    program.remove_task("one")
    assert len(exports) == 1
    names = {"two": "second", "three": "third"}
    losses = program.forward_backward({"two": batch, "three": batch})
    assert_matches(losses, lambda n: adapter_grads(model, names[n]), want)
