"""Program: per-task training state, save/load, inspection, and the user's models afterwards."""

from __future__ import annotations

import copy

import torch
from helpers import rel_err
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig, PeftModel

import muxc


def _tasks(llama):
    a = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1)
    b = make_peft(llama, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0), 2)
    c = make_peft(llama, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 3)
    return {"a": a, "b": b, "c": c}


def _batches(step):
    return {"a": make_batch(2, 6, 10 + step), "b": make_batch(3, 9, 20 + step), "c": make_batch(1, 6, 30 + step)}


def test_step_matches_each_task_trained_alone(llama):
    models = _tasks(llama)
    alone = {n: copy.deepcopy(m) for n, m in models.items()}
    lrs = {"a": 1e-2, "b": 3e-3, "c": 5e-2}
    sgd_b = torch.optim.SGD([p for p in models["b"].parameters() if p.requires_grad], lr=lrs["b"], momentum=0.9)
    sched_c = None
    tasks = [muxc.Task(name="a", model=models["a"], lr=lrs["a"]),
             muxc.Task(name="b", model=models["b"], optimizer=sgd_b),
             muxc.Task(name="c", model=models["c"], lr=lrs["c"])]
    opt_c = None
    program = muxc.compile(tasks, muxc.Options(fusion="spatial"))
    sched_c = torch.optim.lr_scheduler.StepLR(program.states["c"].optimizer, step_size=1, gamma=0.5)
    program.states["c"].lr_scheduler = sched_c
    ref_opts = {
        "a": torch.optim.AdamW([p for p in alone["a"].parameters() if p.requires_grad], lr=lrs["a"]),
        "b": torch.optim.SGD([p for p in alone["b"].parameters() if p.requires_grad], lr=lrs["b"], momentum=0.9),
        "c": (opt_c := torch.optim.AdamW([p for p in alone["c"].parameters() if p.requires_grad], lr=lrs["c"])),
    }
    ref_sched = torch.optim.lr_scheduler.StepLR(opt_c, step_size=1, gamma=0.5)
    for step in range(3):
        batches = _batches(step)
        losses = program.step(batches)
        for n, m in alone.items():
            loss = m(**batches[n]).loss
            loss.backward()
            ref_opts[n].step()
            ref_opts[n].zero_grad()
            assert rel_err(losses[n], loss.detach()) <= 1e-4, (n, step)
        ref_sched.step()
    for n, m in models.items():
        ref = dict(alone[n].named_parameters())
        trained = [(k, p) for k, p in m.named_parameters() if ".default" in k]
        assert trained
        for k, p in trained:
            assert rel_err(p.detach(), ref[k].detach()) <= 1e-4, (n, k)
            assert p.grad is None  # zero_grad(set_to_none) after step
    assert program.states["c"].optimizer.param_groups[0]["lr"] == lrs["c"] * 0.5 ** 3


def test_losses_decrease_when_training(llama):
    models = _tasks(llama)
    program = muxc.compile([muxc.Task(name=n, model=m, lr=3e-2) for n, m in models.items()])
    batches = _batches(0)
    first = program.step(batches)
    for _ in range(8):
        last = program.step(batches)
    assert all(last[n] < first[n] for n in models), (first, last)


def test_save_adapters_round_trip(llama, tmp_path):
    models = _tasks(llama)
    program = muxc.compile([muxc.Task(name=n, model=m, lr=1e-2) for n, m in models.items()])
    program.step(_batches(0))
    paths = program.save_adapters(tmp_path)
    assert sorted(p.name for p in paths) == ["a", "b", "c"]
    batch = make_batch(2, 7, 99)
    for n, m in models.items():
        assert (tmp_path / n / "adapter_model.safetensors").exists()
        loaded = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / n))
        with torch.no_grad():
            want = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), n


def test_user_models_unchanged_and_still_work(llama):
    models = _tasks(llama)
    batch = make_batch(2, 6, 5)
    before = {n: m(**batch).loss.detach() for n, m in models.items()}
    classes = {n: type(m.get_base_model().model.layers[0].self_attn.q_proj.forward) for n, m in models.items()}
    muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()])
    for n, m in models.items():
        q = m.get_base_model().model.layers[0].self_attn.q_proj
        assert "forward" not in vars(q)  # tracing patches were removed
        assert type(q.forward) is classes[n]
        after = m(**batch)
        assert torch.equal(after.loss.detach(), before[n])
        after.loss.backward()  # plain PEFT training still works
        assert any(p.grad is not None for p in m.parameters())


def test_explain_dump_history(llama, tmp_path):
    models = _tasks(llama)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()])
    names = [r.name for r in program.history]
    assert names == ["validate_tasks", "trace_tasks", "share_frozen_weights", "merge_backbones",
                     "rewrite_attention", "partition", "select_kernels"]
    assert all(r.seconds >= 0 for r in program.history)
    rep = program.explain(_batches(0))
    assert [r.task for r in rep.tasks] == ["a", "b", "c"]
    base_bytes = sum(p.numel() * p.element_size() for p in llama.parameters())
    adapter_bytes = sum(r.adapter_bytes for r in rep.tasks)
    assert base_bytes <= rep.frozen_bytes <= base_bytes * 1.01  # + rotary buffers
    assert rep.separate_bytes == 3 * rep.frozen_bytes + adapter_bytes
    assert rep.memory_ratio > 2.0
    assert 0 < rep.padding["ineffective_token_fraction"] < 1
    text = str(rep)
    assert "memory saved" in text and "multi_lora" in text and "multi_ia3" in text
    paths = program.dump(tmp_path)
    assert [p.name for p in paths][:2] == ["pass_00_validate_tasks.txt", "pass_01_trace_tasks.txt"]
    merged = (tmp_path / "pass_03_merge_backbones.txt").read_text()
    assert "OutputSite(model.layers.0.self_attn.v_proj; a:lora,b:lora)" in merged
    assert "InputSite(model.layers.0.mlp.down_proj; b:lora" not in merged
    assert "InputSite(model.layers.0.mlp.down_proj; c:ia3)" in merged
    assert "loss_a" in merged


def test_evaluate_has_no_grad(llama):
    models = _tasks(llama)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()])
    out = program.evaluate(_batches(0))
    assert set(out) == {"a", "b", "c"} and not any(v.requires_grad for v in out.values())
    assert all(p.grad is None for m in models.values() for p in m.parameters())
