"""Program: per-task training state, save/load, inspection, and the user's models afterwards."""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
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


@pytest.fixture(scope="module")
def compiled(llama):
    """The three tasks compiled once, never stepped (tests here only run and inspect it)."""
    models = _tasks(llama)
    batch = make_batch(2, 6, 5)
    with torch.no_grad():
        before = {n: m(**batch).loss for n, m in models.items()}
    classes = {n: type(m.get_base_model().model.layers[0].self_attn.q_proj.forward) for n, m in models.items()}
    ptrs = {n: m.get_base_model().model.layers[0].mlp.up_proj.weight.data_ptr() for n, m in models.items()}
    t0 = time.perf_counter()
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()])
    seconds = time.perf_counter() - t0
    return SimpleNamespace(program=program, models=models, batch=batch, before=before, classes=classes,
                           ptrs=ptrs, seconds=seconds)


def _zero(models) -> None:
    for m in models.values():
        m.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def trained(llama):
    """The three tasks with their own optimizers (AdamW, SGD with momentum, AdamW with a step
    LR schedule) trained 4 steps by the program and, side by side, each alone by plain PEFT."""
    models = _tasks(llama)
    alone = {n: copy.deepcopy(m) for n, m in models.items()}
    lrs = {"a": 1e-2, "b": 3e-3, "c": 5e-2}
    sgd_b = torch.optim.SGD([p for p in models["b"].parameters() if p.requires_grad], lr=lrs["b"], momentum=0.9)
    tasks = [muxc.Task(name="a", model=models["a"], lr=lrs["a"]),
             muxc.Task(name="b", model=models["b"], optimizer=sgd_b),
             muxc.Task(name="c", model=models["c"], lr=lrs["c"])]
    program = muxc.compile(tasks, muxc.Options(fusion="spatial"))
    program.states["c"].lr_scheduler = torch.optim.lr_scheduler.StepLR(
        program.states["c"].optimizer, step_size=1, gamma=0.5)
    ref_opts = {
        "a": torch.optim.AdamW([p for p in alone["a"].parameters() if p.requires_grad], lr=lrs["a"]),
        "b": torch.optim.SGD([p for p in alone["b"].parameters() if p.requires_grad], lr=lrs["b"], momentum=0.9),
        "c": torch.optim.AdamW([p for p in alone["c"].parameters() if p.requires_grad], lr=lrs["c"]),
    }
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opts["c"], step_size=1, gamma=0.5)
    losses, ref_losses = [], []
    batches = _batches(0)  # the same batch every step, so the losses must go down
    for _ in range(4):
        losses.append(program.step(batches))
        ref = {}
        for n, m in alone.items():
            loss = m(**batches[n]).loss
            loss.backward()
            ref_opts[n].step()
            ref_opts[n].zero_grad()
            ref[n] = loss.detach()
        ref_sched.step()
        ref_losses.append(ref)
    return SimpleNamespace(program=program, models=models, alone=alone, losses=losses, ref_losses=ref_losses,
                           lr_c=lrs["c"])


def test_step_matches_each_task_trained_alone(trained):
    for step, (losses, ref) in enumerate(zip(trained.losses, trained.ref_losses)):
        for n in ref:
            assert rel_err(losses[n], ref[n]) <= 1e-4, (n, step)
    for n, m in trained.models.items():
        ref = dict(trained.alone[n].named_parameters())
        params = [(k, p) for k, p in m.named_parameters() if ".default" in k]
        assert params
        for k, p in params:
            assert rel_err(p.detach(), ref[k].detach()) <= 1e-4, (n, k)
            assert p.grad is None  # zero_grad(set_to_none) after step
    steps = len(trained.losses)
    assert trained.program.states["c"].optimizer.param_groups[0]["lr"] == trained.lr_c * 0.5 ** steps


def test_losses_decrease_when_training(trained):
    first, last = trained.losses[0], trained.losses[-1]
    assert all(last[n] < first[n] for n in first), (first, last)


def test_save_adapters_round_trip(llama, trained, tmp_path):
    models = trained.models
    paths = trained.program.save_adapters(tmp_path)
    assert sorted(p.name for p in paths) == ["a", "b", "c"]
    batch = make_batch(2, 7, 99)
    for n, m in models.items():
        assert (tmp_path / n / "adapter_model.safetensors").exists()
        loaded = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / n))
        with torch.no_grad():
            want = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), n


def test_user_models_unchanged_and_still_work(compiled):
    models = compiled.models
    assert len(set(compiled.ptrs.values())) == 3  # separate copies of the base before compiling
    # frozen duplicates now alias the program's one copy (the models compute the same)
    assert len({m.get_base_model().model.layers[0].mlp.up_proj.weight.data_ptr() for m in models.values()}) == 1
    for n, m in models.items():
        q = m.get_base_model().model.layers[0].self_attn.q_proj
        assert "forward" not in vars(q)  # tracing patches were removed
        assert type(q.forward) is compiled.classes[n]
        after = m(**compiled.batch)
        assert torch.equal(after.loss.detach(), compiled.before[n])
        after.loss.backward()  # plain PEFT training still works
        assert any(p.grad is not None for p in m.parameters())
    _zero(compiled.models)


def test_explain_dump_history(llama, compiled, tmp_path):
    program = compiled.program
    names = [r.name for r in program.history]
    assert names == ["validate_tasks", "trace_tasks", "share_frozen_weights", "merge_backbones",
                     "rewrite_attention", "native_gqa", "fuse_swiglu", "fuse_lm_head_loss",
                     "replay_adapter_inputs", "partition", "select_kernels", "plan_recompute"]
    assert [r.index for r in program.history] == list(range(len(names)))
    # each pass is timed inside the compile call (which pass is longest depends on whether
    # tracing exported or re-bound a template from the process-wide store: not asserted)
    assert 0 < sum(r.seconds for r in program.history) <= compiled.seconds
    assert all(r.seconds >= 0 for r in program.history) and program.history[1].seconds > 0
    assert program.history[1].summary.count("TaskGraph(") == 3
    assert program.history[3].text.startswith(repr(program.mux).split(",")[0])  # its own rendering
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
    # LoRA reads the base op's input in parallel (an output site); IA3 on the MLP input of
    # down_proj rescales that input before the base op runs (an input site)
    assert "OutputSite(model.layers.0.mlp.down_proj; b:lora)" in merged
    assert "InputSite(model.layers.0.mlp.down_proj; c:ia3)" in merged
    assert "loss_a" in merged


def test_evaluate_has_no_grad(compiled):
    models, program = compiled.models, compiled.program
    _zero(models)
    out = program.evaluate(_batches(0))
    assert set(out) == {"a", "b", "c"} and not any(v.requires_grad for v in out.values())
    assert all(p.grad is None for m in models.values() for p in m.parameters())


def test_with_options_shares_the_compiled_program(compiled):
    program = compiled.program
    other = program.with_options(fusion="temporal", kernel_impl="triton", micro_batches=2)
    assert other.options == muxc.Options(fusion="temporal", kernel_impl="triton", micro_batches=2)
    assert program.options == muxc.Options()  # the original is unchanged
    assert other.mux is program.mux and other.history is program.history
    assert other.states is program.states and other.tasks is program.tasks
    assert other.adapters is program.adapters and other.partitioned is program.partitioned
    assert other.executor is not program.executor
    assert other.plan(_batches(0)).htasks == [["a"], ["b"], ["c"]]
    assert other.planner is not program.planner
    assert {impl for impl, _ in other.kernel_plan.choices.values()} == {"triton"}
    assert {impl for impl, _ in program.kernel_plan.choices.values()} == {"grouped"}
    assert "fusion=temporal" in repr(other) and "fusion=auto" in repr(program)
    # same adapters: a step of the derived program trains the user's models
    _zero(compiled.models)
    batches = _batches(1)
    spatial = program.with_options(fusion="spatial")
    want = program.evaluate(batches)
    got = spatial.forward_backward(batches)
    assert all(rel_err(got[n], want[n]) <= 1e-5 for n in want)
    assert all(p.grad is not None for m in compiled.models.values() for p in m.parameters() if p.requires_grad)
    _zero(compiled.models)


def test_with_options_refuses_compile_time_options(compiled):
    program = compiled.program
    with pytest.raises(muxc.OptionsError, match=r"cannot change compile-time option\(s\) alignment='chunk' "
                                                  r"\(compiled with 'pad'\).*compile again"):
        program.with_options(alignment="chunk")
    with pytest.raises(muxc.OptionsError, match=r"stages=2 \(compiled with 1\)"):
        program.with_options(stages=2, fusion="spatial")
    with pytest.raises(muxc.OptionsError, match=r"verify=True \(compiled with False\)"):
        program.with_options(verify=True)
    with pytest.raises(muxc.OptionsError, match=r"unknown option\(s\) \['fuse'\]; run-time options: \['fusion'"):
        program.with_options(fuse="spatial")
    # the new combination is validated like Options(...): chunk_size needs alignment='chunk'
    with pytest.raises(muxc.OptionsError, match="chunk_size=8 needs alignment='chunk'"):
        program.with_options(chunk_size=8)
    # restating a compile-time option with its compiled value is not a change
    assert program.with_options(alignment="pad", fusion="spatial").options.fusion is muxc.Fusion.SPATIAL
