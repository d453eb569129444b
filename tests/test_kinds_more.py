"""More PEFT kinds in one program: DoRA (and, below it, the others as they land).

Each (mix, family, alignment) is compiled once per module and run under every fusion through
`Program.with_options`; every task must match isolated HF PEFT (loss and every trainable
parameter's grad, `helpers.REL_TOL`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import REL_TOL, Case, rel_err, separate
from models import CORE_FAMILIES, make_batch, make_peft
from peft import IA3Config, LoraConfig, PeftModel
from peft.tuners.lora.dora import DoraLinearLayer

from muxc.kinds import dora as dora_kind
from muxc.plan.summary import summarize_graph

FUSIONS = ("spatial", "temporal", "auto")


def _scale_magnitudes(model, seed: int) -> None:
    """Move DoRA magnitudes off their initial norms, so ``m / ||W + sBA||`` is not 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _dora(base, seed: int, **config):
    config = {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0, **config}
    model = make_peft(base, LoraConfig(use_dora=True, **config), seed)
    _scale_magnitudes(model, seed + 100)
    return model


def dora_mixed(base, family: str, alignment: str) -> Case:
    """Two DoRA tasks (ranks 4 and 2, one rsLoRA on some targets) next to LoRA and IA3."""
    some = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"],
            "opt": ["q_proj", "v_proj", "fc1"]}[family]
    spec = [
        ("dora", _dora(base, 1)),
        ("dora_rs", _dora(base, 2, r=2, lora_alpha=5, use_rslora=True, target_modules=some)),
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 3)),
        ("ia3", make_peft(base, IA3Config(), 4)),
    ]
    batches = {"dora": make_batch(2, 9, 1), "dora_rs": make_batch(3, 5, 2, pad_rows=2),
               "lora": make_batch(2, 7, 3), "ia3": make_batch(1, 6, 4)}
    return separate(spec, batches, alignment=alignment)


@pytest.fixture(scope="module")
def case(bases):
    cache: dict[tuple, Case] = {}

    def get(family: str, alignment: str = "pad") -> Case:
        if (family, alignment) not in cache:
            cache[family, alignment] = dora_mixed(bases(family), family, alignment)
        return cache[family, alignment]

    return get


# ------------------------------------------------------------------------------------- DoRA

# tracing dominates: llama and gpt2 (Conv1D) by default, the rest of the matrix with -m slow
SLOW = pytest.mark.slow
PAD_FAMILIES = ("llama", "gpt2", pytest.param("opt", marks=SLOW))
CHUNK_FAMILIES = ("llama", pytest.param("gpt2", marks=SLOW), pytest.param("opt", marks=SLOW))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", PAD_FAMILIES)
def test_dora_mixed_with_lora_and_ia3_pad(case, family, fusion):
    case(family).check(fusion=fusion)


@pytest.mark.parametrize("family", CHUNK_FAMILIES)
def test_dora_mixed_with_lora_and_ia3_chunk(case, family):
    c = case(family, "chunk")
    c.check(fusion="auto")
    c.check(fusion="spatial", chunk_size=4)  # samples span chunks: kept K/V crosses DoRA layers


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_dora_alone(bases, family):
    c = separate([("dora", _dora(bases(family), 7))], {"dora": make_batch(3, 6, 5)})
    c.check(fusion="spatial")
    c.check(kernel_impl="torch")


def test_dora_reference_grads_reach_every_magnitude(case):
    """The equivalence above covers the magnitudes: PEFT trains them, and so do we."""
    c = case("llama")
    names = [n for n in c.refs["dora"][1] if "lora_magnitude_vector" in n]
    assert len(names) == 14  # 7 linears x 2 layers
    assert all(c.refs["dora"][1][n].norm() > 0 for n in names)


def test_dora_one_lora_call_per_site_for_all_tasks(case, monkeypatch):
    """Both DoRA tasks' LoRA terms at a site go through ONE multi_lora call, and their weight
    norms through one batched GEMM."""
    c = case("llama")
    calls, norms = [], []
    real_lora, real_norms = dora_kind.multi_lora, dora_kind.weight_norms
    monkeypatch.setattr(dora_kind, "multi_lora", lambda x, segs, a, *r, **k: calls.append(
        sum(t.shape[0] > 0 for t in a)) or real_lora(x, segs, a, *r, **k))
    monkeypatch.setattr(dora_kind, "weight_norms", lambda w, f, a, *r: norms.append(len(a))
                        or real_norms(w, f, a, *r))
    program = c.program.with_options(fusion="spatial")
    c.zero_grad()
    program.forward_backward(c.batches)
    c.zero_grad()
    dora_sites = [s for s, recs in program.mux.sites.items() if any(r.kind.value == "dora" for r in recs)]
    assert len(calls) == len(dora_sites) == 14
    # q/v/up_proj hold both DoRA tasks: one call with two non-empty adapters
    assert sorted(calls).count(2) == 6 and sorted(norms).count(2) == 6


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_norms_batched_equal_peft_per_task(fan_in_fan_out):
    g = torch.Generator().manual_seed(0)
    w = torch.randn((24, 16) if fan_in_fan_out else (16, 24), generator=g)
    ranks, scaling = (1, 4, 3), (2.0, 0.5, 1.25)
    a = [torch.randn(r, 24, generator=g) for r in ranks]
    b = [torch.randn(16, r, generator=g) for r in ranks]
    got = dora_kind.weight_norms(w, fan_in_fan_out, a, b, scaling)
    layer = DoraLinearLayer(fan_in_fan_out)
    for i in range(len(ranks)):
        want = layer.get_weight_norm(w, b[i] @ a[i], scaling[i])
        assert rel_err(got[i], want) <= 1e-6


def test_dora_saves_loadable_by_peft(bases, case, tmp_path):
    c = case("gpt2")
    c.program.save_adapters(tmp_path)
    model = c.models[0]
    batch = make_batch(2, 7, 99)
    loaded = PeftModel.from_pretrained(copy.deepcopy(bases("gpt2")), str(tmp_path / "dora"))
    assert loaded.peft_config["default"].use_dora
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rel_err(got, want) <= 1e-6
    mags = {n: p for n, p in loaded.named_parameters() if "lora_magnitude_vector" in n}
    own = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert mags and mags.keys() == own.keys()
    assert all(torch.equal(mags[n], own[n]) for n in own)


def test_dora_is_priced_above_lora_of_its_rank(case):
    """The cost model charges DoRA its LoRA work plus the per-call weight norm (forward only)."""
    summary = summarize_graph(case("llama").program.mux)
    norm_ops = [o for o in summary.ops if o.task == "dora" and o.node.endswith(":norm_gemm]")]
    assert len(norm_ops) == 14
    assert all(o.forward.key.kind.value == "gemm" and o.backward is None for o in norm_ops)
    lora_ops = [o for o in summary.ops if o.task == "lora"]
    dora_ops = [o for o in summary.ops if o.task == "dora"]
    # per site: LoRA work, norm GEMM, norm pass (LoRA: its work); and each task's loss
    assert len(dora_ops) - 1 == 3 * (len(lora_ops) - 1)
