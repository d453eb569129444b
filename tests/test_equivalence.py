"""The core property: every task's loss and adapter grads equal isolated HF PEFT.

Tracing dominates the cost of these tests, and fusion and kernel choice are run-time options:
each (task mix, family) is compiled once per module and run with every option set through
`Program.with_options`, with gradients zeroed between runs.
"""

from __future__ import annotations

import pytest
from helpers import Case, adapter_grads, assert_matches, isolated, separate
from models import CORE_FAMILIES, OTHER_FAMILIES, make_batch, make_peft, perturb
from peft import IA3Config, LoraConfig

import muxc

FUSIONS = ("spatial", "temporal", "auto")


def _ia3(family: str) -> IA3Config:
    if family == "stablelm":  # PEFT has no IA3 default targets for it
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return IA3Config()


def two_lora_ranks_one_rslora(base, family) -> Case:
    spec = [
        ("r4", make_peft(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("r16rs", make_peft(base, LoraConfig(r=16, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                             lora_dropout=0.0), 2)),
    ]
    return separate(spec, {"r4": make_batch(2, 9, 1), "r16rs": make_batch(3, 5, 2, pad_rows=2)})


def lora_qv_lora_all_ia3(base, family) -> Case:
    qv = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}[family]
    spec = [
        ("qv", make_peft(base, LoraConfig(r=8, target_modules=qv, lora_dropout=0.0), 1)),
        ("all", make_peft(base, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, _ia3(family), 3)),
    ]
    return separate(spec, {"qv": make_batch(1, 12, 1), "all": make_batch(4, 6, 2, pad_rows=3),
                            "ia3": make_batch(2, 3, 3)})


def one_peft_model_two_adapters(base, family) -> Case:
    model = make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", lora_dropout=0.0))
    perturb(model, 5)
    batches = {"first": make_batch(2, 7, 1), "second": make_batch(3, 10, 2)}
    refs = {"first": isolated(model, batches["first"], "default"),
            "second": isolated(model, batches["second"], "second")}
    model.set_adapter("default")
    tasks = [muxc.Task(name="first", model=model, adapter_name="default"),
             muxc.Task(name="second", model=model, adapter_name="second")]
    program = muxc.compile(tasks, muxc.Options(verify=True))
    names = {"first": "default", "second": "second"}
    return Case(program, batches, refs, lambda n: adapter_grads(model, names[n]), [model])


MIXES = {f.__name__: f for f in (two_lora_ranks_one_rslora, lora_qv_lora_all_ia3, one_peft_model_two_adapters)}


@pytest.fixture(scope="module")
def case(bases):
    """(mix, family) -> its `Case`, compiled on first use and kept for the module."""
    cache: dict[tuple[str, str], Case] = {}

    def get(mix: str, family: str) -> Case:
        if (mix, family) not in cache:
            cache[mix, family] = MIXES[mix](bases(family), family)
        return cache[mix, family]

    return get


# llama by default; gpt2/opt with -m slow (test_lora_qv_lora_all_ia3 runs all three by default)
LLAMA_FIRST = ("llama", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("opt", marks=pytest.mark.slow))
# llama-like attention/MLP families (and gemma, phi), GPT-NeoX and Bloom (ALiBi: in
# test_chunks.py by default) under -m slow; Falcon (parallel blocks) and GPTBigCode
# (multi-query) by default
OTHER = [f if f in ("falcon", "gpt_bigcode") else pytest.param(f, marks=pytest.mark.slow)
         for f in OTHER_FAMILIES]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", LLAMA_FIRST)
def test_two_lora_ranks_one_rslora(case, family, fusion):
    case("two_lora_ranks_one_rslora", family).check(fusion=fusion)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_lora_qv_lora_all_ia3(case, family, fusion):
    case("lora_qv_lora_all_ia3", family).check(fusion=fusion)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", LLAMA_FIRST)
def test_one_peft_model_two_adapters(case, family, fusion):
    case("one_peft_model_two_adapters", family).check(fusion=fusion)


@pytest.mark.parametrize("family", OTHER)
def test_other_families_lora_and_ia3(bases, family):
    base = bases(family)
    spec = [
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("ia3", make_peft(base, _ia3(family), 2)),
    ]
    c = separate(spec, {"lora": make_batch(2, 7, 1), "ia3": make_batch(3, 5, 2)}, fusion="spatial")
    c.check()
    c.check(fusion="temporal")


def test_grads_accumulate_across_calls(case):
    c = case("two_lora_ranks_one_rslora", "llama")
    more = {"r4": make_batch(3, 6, 7), "r16rs": make_batch(2, 8, 8)}
    models = dict(zip(c.refs, c.models))
    second = {n: isolated(models[n], more[n])[1] for n in more}
    c.zero_grad()
    c.program.forward_backward(c.batches)
    c.program.with_options(fusion="temporal").forward_backward(more)  # programs share the adapters
    for n, (_, first) in c.refs.items():
        got = c.grads(n)
        assert set(got) == set(first)
        for p in first:
            expected = first[p] + second[n][p]
            assert ((got[p] - expected).norm() / expected.norm()).item() <= 1e-4, (n, p)
    c.zero_grad()


def test_task_absent_from_a_step_gets_no_loss_and_no_grad(case):
    c = case("two_lora_ranks_one_rslora", "llama")
    c.zero_grad()
    for fusion in FUSIONS:
        losses = c.program.with_options(fusion=fusion).forward_backward({"r16rs": c.batches["r16rs"]})
        assert list(losses) == ["r16rs"]
        assert c.grads("r4") == {}
        assert_matches(losses, c.grads, {"r16rs": c.refs["r16rs"]})
        c.zero_grad()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_forced_whole_model(case, family):
    """Whole-model equivalence with every adapter op on the Triton kernels (interpreter on CPU)."""
    from muxc.kernels import _triton

    c = case("lora_qv_lora_all_ia3", family)
    before = sum(_triton.launches().values())
    program = c.check(fusion="spatial", kernel_impl="triton")
    assert {impl for impl, _ in program.kernel_plan.choices.values()} == {"triton"}
    assert sum(_triton.launches().values()) > before  # the Triton kernels really ran
