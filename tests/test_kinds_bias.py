"""Bias training (LoRA ``bias="all"`` / ``"lora_only"``): per-task bias deltas on a shared op.

Each task's biases are moved off the base's (as training would) before compiling, so the
delta ``b_task - b_shared`` is not zero; a plain LoRA task beside them reads the base biases.
Each (family, alignment) is compiled once per module and run under every fusion through
`Program.with_options`; every task must match isolated HF PEFT (loss and the grad of every
parameter PEFT trains, biases included, `helpers.REL_TOL`).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import REL_TOL, Case, assert_matches, cached, isolated, rel_err
from models import _cfg, make_batch, make_peft
from peft import LoraConfig, PeftModel

import muxc
from muxc.ir import AdapterKind, Role, info

FUSIONS = ("spatial", "temporal", "auto")


def _base(family: str) -> torch.nn.Module:
    cfg, cls = _cfg(family)
    if family == "llama":  # biased q/k/v/o and MLP linears
        cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(0)
    return cls(cfg).eval()


def _move_biases(model, seed: int) -> None:
    """Give the task's trainable biases values of their own (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _task(base, seed: int, **config):
    config = {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0, **config}
    model = make_peft(base, LoraConfig(**config), seed)
    if config.get("bias", "none") != "none":
        _move_biases(model, seed + 100)
    return model


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def bias_mixed(family: str, alignment: str) -> Case:
    base = _base(family)
    some = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"],
            "opt": ["q_proj", "v_proj", "fc1"]}[family]
    spec = [
        ("all", _task(base, 1, bias="all")),
        ("lora_only", _task(base, 2, r=2, bias="lora_only", target_modules=some)),
        ("lora", _task(base, 3)),
    ]
    batches = {"all": make_batch(2, 9, 1), "lora_only": make_batch(3, 5, 2, pad_rows=2),
               "lora": make_batch(2, 7, 3)}
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(verify=True, alignment=alignment))
    return Case(program, batches, refs, lambda n: _trainable_grads(models[n]), list(models.values()))


@pytest.fixture(scope="module")
def case():
    return cached(lambda family, alignment="pad": bias_mixed(family, alignment))


SLOW = pytest.mark.slow
PAD_FAMILIES = ("gpt2", pytest.param("opt", marks=SLOW), pytest.param("llama", marks=SLOW))  # Conv1D + LayerNorm, Linear
CHUNK_FAMILIES = ("gpt2", pytest.param("opt", marks=SLOW), pytest.param("llama", marks=SLOW))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", PAD_FAMILIES)
def test_bias_training_mixed_with_lora_pad(case, family, fusion):
    case(family).check(fusion=fusion)


@pytest.mark.parametrize("family", CHUNK_FAMILIES)
def test_bias_training_mixed_with_lora_chunk(case, family):
    c = case(family, "chunk")
    c.check(fusion="auto")
    c.check(fusion="spatial", chunk_size=4)


def test_reference_trains_the_biases_we_check(case):
    """The equivalence covers biases: PEFT trains them (LayerNorms too with "all") and their
    grads are compared; the plain LoRA task trains none."""
    c = case("gpt2")
    all_bias = [n for n in c.refs["all"][1] if n.endswith(".bias")]
    only_bias = [n for n in c.refs["lora_only"][1] if n.endswith(".bias")]
    # 2 layers x (ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj) + ln_f
    assert len(all_bias) == 13 and any(".ln_1." in n for n in all_bias)
    assert len(only_bias) == 4 and all(".base_layer." in n for n in only_bias)
    assert not [n for n in c.refs["lora"][1] if n.endswith(".bias")]


def test_shared_op_reads_a_frozen_snapshot(case):
    """The shared op's bias is never a trained tensor: the plain task's (untrained) one."""
    c = case("opt")
    trained = {id(p) for m in c.models[:2] for p in m.parameters() if p.requires_grad}
    mux = c.program.mux
    frozen = [mux.tensors[n.name] for n in mux.gm.graph.find_nodes(op="placeholder")
              if info(n).role is Role.FROZEN and n.name.endswith("bias")]
    assert frozen and not any(id(t) in trained for t in frozen)
    kinds = {r.kind for recs in c.program.mux.sites.values() for r in recs}
    assert AdapterKind.BIAS in kinds


def test_save_round_trip_restores_the_biases(case, tmp_path):
    c = case("gpt2")
    c.program.save_adapters(tmp_path)
    for name, model in (("all", c.models[0]), ("lora_only", c.models[1])):
        loaded = PeftModel.from_pretrained(_base("gpt2"), tmp_path / name)
        mine = dict(model.named_parameters())
        theirs = dict(loaded.named_parameters())
        biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
        assert biases
        for n in biases:
            assert torch.equal(theirs[n], mine[n]), n


def test_cost_model_prices_bias_sites(case):
    """A bias-only site (a LayerNorm) costs the task a per-token pointwise op over its width,
    and the task's trained biases count in its adapter size."""
    from muxc.plan.ops import OpKind
    from muxc.plan.summary import summarize_graph

    c = case("gpt2")
    summary = summarize_graph(c.program.mux)
    ln = [op for op in summary.ops if op.site and "ln_1" in op.site and op.task == "all"]
    assert ln and all(op.forward.key.kind is OpKind.IA3 and op.forward.key.shape == (32,) for op in ln)
    assert not [op for op in summary.ops if op.site and "ln_1" in op.site and op.task == "lora"]
    trained = sum(p.numel() for p in c.models[0].parameters() if p.requires_grad)
    assert summary.adapter_numel["all"] == trained


def _assert_matches_zero_aware(losses, grads_of, refs) -> None:
    """`assert_matches`, except for a gradient that is zero in exact arithmetic: a key
    projection's bias (softmax ignores a shift shared by a query's keys), which PEFT computes as
    round-off (~1e-11 against grads ~1e-1). Such a grad (reference below 1e-7 of the task's
    largest) must be round-off in ours too; every other grad within `REL_TOL`."""
    for name, (ref_loss, ref_grads) in refs.items():
        assert rel_err(losses[name], ref_loss) <= REL_TOL, name
        got = grads_of(name)
        assert set(got) == set(ref_grads) and ref_grads, name
        top = max(g.norm() for g in ref_grads.values())
        for pname, g in ref_grads.items():
            if g.norm() < 1e-7 * top:
                assert got[pname].norm() < 1e-7 * top, (name, pname)
            else:
                assert rel_err(got[pname], g) <= REL_TOL, (name, pname, rel_err(got[pname], g))


def dora_bias(family: str, alignment: str) -> Case:
    """DoRA tasks training biases ("all", "lora_only") beside DoRA, bias-only and LoRA tasks."""
    base = _base(family)
    spec = [
        ("dora_all", _task(base, 1, bias="all", use_dora=True)),
        ("dora_only", _task(base, 2, r=2, bias="lora_only", use_dora=True)),
        ("dora", _task(base, 4, use_dora=True)),
        ("all", _task(base, 5, bias="all")),
        ("lora", _task(base, 3)),
    ]
    batches = {"dora_all": make_batch(2, 9, 1), "dora_only": make_batch(3, 5, 2, pad_rows=2),
               "dora": make_batch(2, 6, 4), "all": make_batch(1, 8, 5), "lora": make_batch(2, 7, 3)}
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(verify=True, alignment=alignment))
    return Case(program, batches, refs, lambda n: _trainable_grads(models[n]), list(models.values()))


@pytest.mark.parametrize("family,alignment", [
    ("gpt2", "pad"), pytest.param("gpt2", "chunk", marks=SLOW),  # chunk: the same site code
    pytest.param("opt", "pad", marks=SLOW), pytest.param("opt", "chunk", marks=SLOW),
    pytest.param("llama", "pad", marks=SLOW), pytest.param("llama", "chunk", marks=SLOW),
])
def test_dora_with_bias_training_equals_isolated_peft(family, alignment):
    """DoRA's renormalisation subtracts the task's OWN bias (PEFT: ``base_result -
    base_layer.bias``), which the bias kind added first at the same site."""
    c = dora_bias(family, alignment)
    assert any(n.endswith(".bias") and "lora_magnitude" not in n for n in c.refs["dora_all"][1])
    for fusion in FUSIONS:
        program = c.program.with_options(fusion=fusion, **({"chunk_size": 4} if alignment == "chunk" else {}))
        c.zero_grad()
        _assert_matches_zero_aware(program.forward_backward(c.batches), c.grads, c.refs)
    c.zero_grad()
