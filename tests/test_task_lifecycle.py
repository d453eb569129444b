"""Program.add_task / remove_task: tasks come and go; every task trains as it would alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err
from models import build_base, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

CONFIGS = {
    "a": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1, 1e-2),
    "b": (LoraConfig(r=8, target_modules=["up_proj", "o_proj"], lora_dropout=0.0), 2, 2e-2),
    "c": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 3, 5e-2),
    "d": (LoraConfig(r=2, target_modules=["k_proj", "gate_proj"], lora_dropout=0.0), 4, 1e-2),
}
SHAPES = {"a": (2, 6), "b": (3, 9), "c": (1, 6), "d": (2, 8)}


def _batch(name: str, step: int) -> dict:
    rows, seq = SHAPES[name]
    return make_batch(rows, seq, 10 * step + ord(name))


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_add_then_remove_equals_isolated_training(llama):
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
    schedule = {1: "abc", 2: "abc", 3: "abcd", 4: "acd"}
    for step, names in schedule.items():
        if step == 3:  # d joins after step 2: the others' optimizers keep their state
            kept = {n: program.states[n] for n in "abc"}
            program.add_task(muxc.Task(name="d", model=models["d"], lr=CONFIGS["d"][2]))
            assert all(program.states[n] is kept[n] and kept[n].steps == 2 for n in "abc")
            assert [r.name for r in program.history][1] == "trace_tasks"
            # task graphs do not outlive a compile: each distinct structure is traced again
            assert program.history[1].summary.startswith("4 exported, 0 re-bound")
        if step == 4:  # b leaves after step 3
            program.remove_task("b")
            assert list(program.tasks) == ["a", "c", "d"] and list(program.mux.tasks) == ["a", "c", "d"]
        program.step({n: _batch(n, step) for n in names})
        reference_step(names, step)
    assert trained == {"a": 4, "b": 3, "c": 4, "d": 2}
    assert {n: s.steps for n, s in program.states.items()} == {"a": 4, "c": 4, "d": 2}
    for n, m in models.items():
        got, want = _adapters(m), _adapters(alone[n])
        start = _adapters(make_peft(llama, CONFIGS[n][0], CONFIGS[n][1]))
        assert got.keys() == want.keys() and got
        for k in want:
            assert not torch.equal(want[k], start[k]), k  # it did train
            assert rel_err(got[k], want[k]) <= 1e-4, (n, k)
    # frozen weights still shared once: the new task's copy was re-pointed at the program's
    ptrs = {models[n].get_base_model().model.layers[0].mlp.up_proj.weight.data_ptr() for n in "acd"}
    assert len(ptrs) == 1


def test_add_task_refusals_leave_program_unchanged(llama):
    program = muxc.compile([muxc.Task(name="a", model=make_peft(llama, CONFIGS["a"][0], 1))])
    before = (program.mux, dict(program.states), list(program.tasks))
    other_base = build_base("llama", seed=5)
    with pytest.raises(muxc.BaseWeightMismatchError, match="differs between tasks 'a' and 'x'"):
        program.add_task(muxc.Task(name="x", model=make_peft(other_base, CONFIGS["b"][0], 2)))
    with pytest.raises(muxc.TaskSpecError, match="duplicate task names"):
        program.add_task(muxc.Task(name="a", model=make_peft(llama, CONFIGS["b"][0], 2)))
    with pytest.raises(muxc.TaskSpecError, match="unknown task 'zz'"):
        program.remove_task("zz")
    with pytest.raises(muxc.TaskSpecError, match="only task"):
        program.remove_task("a")
    assert (program.mux, dict(program.states), list(program.tasks)) == before
