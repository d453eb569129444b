"""The core property: every task's loss and adapter grads equal isolated HF PEFT."""

from __future__ import annotations

import pytest
from helpers import adapter_grads, assert_matches, isolated
from models import CORE_FAMILIES, OTHER_FAMILIES, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

FUSIONS = ("spatial", "temporal")


def _ia3(family: str) -> IA3Config:
    if family == "stablelm":  # PEFT has no IA3 default targets for it
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return IA3Config()


def _separate(tasks_spec, batches):
    """Compile-ready tasks + isolated references for tasks on separate models."""
    refs = {name: isolated(model, batches[name]) for name, model in tasks_spec}
    tasks = [muxc.Task(name=name, model=model) for name, model in tasks_spec]
    grads = {name: (lambda m=model: adapter_grads(m, "default")) for name, model in tasks_spec}
    return tasks, refs, grads


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_two_lora_ranks_one_rslora(bases, family, fusion):
    base = bases(family)
    spec = [
        ("r4", make_peft(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("r16rs", make_peft(base, LoraConfig(r=16, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                             lora_dropout=0.0), 2)),
    ]
    batches = {"r4": make_batch(2, 9, 1), "r16rs": make_batch(3, 5, 2, pad_rows=2)}
    tasks, refs, grads = _separate(spec, batches)
    program = muxc.compile(tasks, muxc.Options(fusion=fusion, verify=True))
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: grads[n](), refs)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_lora_qv_lora_all_ia3(bases, family, fusion):
    base = bases(family)
    qv = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}[family]
    spec = [
        ("qv", make_peft(base, LoraConfig(r=8, target_modules=qv, lora_dropout=0.0), 1)),
        ("all", make_peft(base, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, _ia3(family), 3)),
    ]
    batches = {"qv": make_batch(1, 12, 1), "all": make_batch(4, 6, 2, pad_rows=3), "ia3": make_batch(2, 3, 3)}
    tasks, refs, grads = _separate(spec, batches)
    program = muxc.compile(tasks, muxc.Options(fusion=fusion, verify=True))
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: grads[n](), refs)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_one_peft_model_two_adapters(bases, family, fusion):
    model = make_peft(bases(family), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", lora_dropout=0.0))
    from models import perturb

    perturb(model, 5)
    batches = {"first": make_batch(2, 7, 1), "second": make_batch(3, 10, 2)}
    refs = {"first": isolated(model, batches["first"], "default"),
            "second": isolated(model, batches["second"], "second")}
    model.set_adapter("default")
    tasks = [muxc.Task(name="first", model=model, adapter_name="default"),
             muxc.Task(name="second", model=model, adapter_name="second")]
    program = muxc.compile(tasks, muxc.Options(fusion=fusion, verify=True))
    losses = program.forward_backward(batches)
    names = {"first": "default", "second": "second"}
    assert_matches(losses, lambda n: adapter_grads(model, names[n]), refs)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_families_lora_and_ia3(bases, family):
    base = bases(family)
    spec = [
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("ia3", make_peft(base, _ia3(family), 2)),
    ]
    batches = {"lora": make_batch(2, 7, 1), "ia3": make_batch(3, 5, 2)}
    tasks, refs, grads = _separate(spec, batches)
    program = muxc.compile(tasks, muxc.Options(fusion="spatial", verify=True))
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: grads[n](), refs)


def test_grads_accumulate_across_calls(llama):
    model = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1)
    b1, b2 = make_batch(2, 6, 1), make_batch(2, 8, 2)
    _, g1 = isolated(model, b1)
    _, g2 = isolated(model, b2)
    program = muxc.compile([muxc.Task(name="t", model=model)])
    program.forward_backward({"t": b1})
    program.forward_backward({"t": b2})
    got = adapter_grads(model, "default")
    for n in g1:
        expected = g1[n] + g2[n]
        assert ((got[n] - expected).norm() / expected.norm()).item() <= 1e-4


def test_task_absent_from_a_step_gets_no_loss_and_no_grad(llama):
    a = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 1)
    b = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 2)
    program = muxc.compile([muxc.Task(name="a", model=a), muxc.Task(name="b", model=b)])
    losses = program.forward_backward({"b": make_batch(2, 5, 1)})
    assert list(losses) == ["b"]
    assert all(p.grad is None for n, p in a.named_parameters() if "lora" in n)
    assert all(p.grad is not None for n, p in b.named_parameters() if "lora" in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_forced_whole_model(bases, family):
    """Whole-model equivalence with every adapter op on the Triton kernels (interpreter on CPU)."""
    from muxc.kernels import _triton

    base = bases(family)
    spec = [
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("lora16", make_peft(base, LoraConfig(r=16, use_rslora=True, target_modules="all-linear",
                                              lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, _ia3(family), 3)),
    ]
    batches = {"lora": make_batch(2, 7, 1), "lora16": make_batch(1, 9, 2), "ia3": make_batch(3, 4, 3)}
    tasks, refs, grads = _separate(spec, batches)
    program = muxc.compile(tasks, muxc.Options(fusion="spatial", kernel_impl="triton", verify=True))
    assert {impl for impl, _ in program.kernel_plan.choices.values()} == {"triton"}
    before = sum(_triton.launches().values())
    losses = program.forward_backward(batches)
    assert sum(_triton.launches().values()) > before  # the Triton kernels really ran
    assert_matches(losses, lambda n: grads[n](), refs)
