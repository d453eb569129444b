"""More PEFT kinds in one program: DoRA (and, below it, the others as they land).

Each (mix, family, alignment) is compiled once per module and run under every fusion through
`Program.with_options`; every task must match isolated HF PEFT (loss and every trainable
parameter's grad, `helpers.REL_TOL`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import REL_TOL, Case, cached, rel_err, separate
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig, PeftModel
from peft.tuners.lora.dora import DoraLinearLayer

import muxc
from muxc.ir import AdapterKind
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
    return cached(lambda family, alignment="pad": dora_mixed(bases(family), family, alignment))


# ------------------------------------------------------------------------------------- DoRA

# tracing dominates: llama and gpt2 (Conv1D) by default, the rest of the matrix with -m slow
SLOW = pytest.mark.slow
PAD_FAMILIES = ("llama", pytest.param("gpt2", marks=SLOW), pytest.param("opt", marks=SLOW))
# chunk alignment: DoRA runs in auto/chunk in tests/test_kinds_mixed.py by default
CHUNK_FAMILIES = tuple(pytest.param(f, marks=SLOW) for f in ("llama", "gpt2", "opt"))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("family", PAD_FAMILIES)
def test_dora_mixed_with_lora_and_ia3_pad(case, family, fusion):
    case(family).check(fusion=fusion)


@pytest.mark.parametrize("family", CHUNK_FAMILIES)
def test_dora_mixed_with_lora_and_ia3_chunk(case, family):
    c = case(family, "chunk")
    c.check(fusion="auto")
    c.check(fusion="spatial", chunk_size=4)  # samples span chunks: kept K/V crosses DoRA layers


# llama's DoRA runs in the mixed cases above; alone, gpt2 covers Conv1D (opt: -m slow)
@pytest.mark.parametrize("family", (pytest.param("llama", marks=SLOW), "gpt2", pytest.param("opt", marks=SLOW)))
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


# ------------------------------------------------------------- SEQ_CLS tasks and task heads

_CLS = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
        "opt": "OPTForSequenceClassification"}


def _cls_model(base, family: str, num_labels: int, seed: int, problem_type=None, dora=False):
    """A SEQ_CLS PeftModel whose backbone is ``base``'s (same weights), head random."""
    import transformers

    cfg = copy.deepcopy(base.config)
    cfg.num_labels, cfg.problem_type = num_labels, problem_type
    torch.manual_seed(seed)
    model = getattr(transformers, _CLS[family])(cfg)
    trunk = base.base_model_prefix
    getattr(model, trunk).load_state_dict(getattr(base, trunk).state_dict())
    pm = make_peft(model.eval(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                            lora_dropout=0.0, use_dora=dora), seed, copy_base=False)
    _scale_magnitudes(pm, seed)
    return pm


def _cls_batch(rows: int, seq: int, seed: int, labels: torch.Tensor) -> dict:
    b = make_batch(rows, seq, seed, pad_rows=rows - 1)
    del b["labels"]
    return {**b, "labels": labels}


def cls_mixed(base, family: str, alignment: str = "pad") -> Case:
    """Five kinds on one backbone: single-label (DoRA), multi-label and regression SEQ_CLS tasks
    with their heads, a causal LoRA task, a causal IA3 task and a causal task training its own
    lm_head copy."""
    g = torch.Generator().manual_seed(0)
    qv = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}[family]
    spec = [
        ("sst2", _cls_model(base, family, 2, 5, dora=True)),
        ("multi", _cls_model(base, family, 3, 6, "multi_label_classification")),
        ("reg", _cls_model(base, family, 1, 7)),
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, IA3Config(), 4)),
        ("lm_head", make_peft(base, LoraConfig(r=2, target_modules=qv, lora_dropout=0.0,
                                               modules_to_save=["lm_head"]), 8)),
    ]
    batches = {"sst2": _cls_batch(3, 7, 1, torch.tensor([0, 1, 1])),
               "multi": _cls_batch(2, 9, 2, (torch.rand(2, 3, generator=g) > 0.5).float()),
               "reg": _cls_batch(2, 5, 3, torch.randn(2, generator=g)),
               "lora": make_batch(2, 7, 3), "ia3": make_batch(1, 6, 4), "lm_head": make_batch(2, 8, 6)}
    return separate(spec, batches, alignment=alignment)


@pytest.fixture(scope="module")
def cls_case(bases):
    return cached(lambda family, alignment="pad": cls_mixed(bases(family), family, alignment))


@pytest.mark.parametrize("family", ("llama", pytest.param("gpt2", marks=SLOW), pytest.param("opt", marks=SLOW)))
def test_seq_cls_heads_mixed_with_causal_tasks(cls_case, family):
    c = cls_case(family)
    for fusion in FUSIONS:
        c.check(fusion=fusion)
    c.check(fusion="spatial", micro_batches=2)  # per-row labels split across micro-batches


def test_seq_cls_head_grads_are_checked(cls_case):
    c = cls_case("llama")
    for task in ("sst2", "multi", "reg"):
        heads = [n for n in c.refs[task][1] if "score.modules_to_save" in n]
        assert sorted(n.rsplit(".", 1)[-1] for n in heads) == ["weight"]  # Llama's score has no bias
    assert any("lm_head.modules_to_save" in n for n in c.refs["lm_head"][1])
    assert any("lora_magnitude_vector" in n for n in c.refs["sst2"][1])
    assert set(c.program.mux.heads) == {"sst2", "multi", "reg", "lm_head"}


def test_seq_cls_labels_are_validated(cls_case):
    c = cls_case("llama")
    bad = dict(c.batches)
    bad["sst2"] = {**c.batches["sst2"], "labels": torch.tensor([0, 2, 1])}
    with pytest.raises(muxc.BatchError, match=r"'sst2': label 2 at \[1\] is not a class id in \[0, 2\)"):
        c.program.forward_backward(bad)
    bad["sst2"] = {**c.batches["sst2"], "labels": torch.zeros(3, 7, dtype=torch.long)}
    with pytest.raises(muxc.BatchError, match=r"int64 class ids shaped \(3,\)"):
        c.program.forward_backward(bad)
    bad = dict(c.batches)
    bad["reg"] = {**c.batches["reg"], "labels": torch.tensor([1, 2])}
    with pytest.raises(muxc.BatchError, match=r"'reg': regression labels must be floating point shaped \(2,\)"):
        c.program.forward_backward(bad)
    bad = dict(c.batches)
    bad["multi"] = {**c.batches["multi"], "labels": torch.ones(2)}
    with pytest.raises(muxc.BatchError, match=r"multi-label labels must be floating point shaped \(2, 3\)"):
        c.program.forward_backward(bad)


def test_seq_cls_head_saves_loadable_by_peft(bases, cls_case, tmp_path):
    c = cls_case("llama")
    c.program.save_adapters(tmp_path)
    import transformers

    for task, model in zip(("sst2", "reg"), (c.models[0], c.models[2])):
        fresh = transformers.LlamaForSequenceClassification(model.config)  # random head and trunk
        fresh.model.load_state_dict(bases("llama").model.state_dict())
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / task))
        b = c.batches[task]
        with torch.no_grad():
            want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert rel_err(got, want) <= 1e-6, task


def _cls_chunk_cells():
    """All under -m slow: SEQ_CLS in auto/chunk 4 runs by default in tests/test_kinds_mixed.py,
    the pooling rule in test_seq_cls_chunk_pools_where_hf_does."""
    cells = []
    for family in ("llama", "gpt2", "opt"):
        for fusion, chunk in (("spatial", 3), ("temporal", 4), ("auto", 16), ("auto", None)):
            fast = False  # SEQ_CLS with auto/chunk 4 runs by default in test_kinds_mixed.py
            cells.append(pytest.param(family, fusion, chunk, marks=() if fast else SLOW,
                                      id=f"{family}-{fusion}-c{chunk}"))
    return cells


@pytest.mark.parametrize("family,fusion,chunk", _cls_chunk_cells())
def test_seq_cls_heads_with_chunk_alignment(cls_case, family, fusion, chunk):
    """Each sample's pooled (last) token is taken in the chunk step that holds it; the head and
    HF's mean loss are summed over those steps. Chunk 3 puts samples' last tokens in several
    steps (and streams hold several samples); 16 holds every sample in one chunk."""
    cls_case(family, "chunk").check(fusion=fusion, chunk_size=chunk)


def test_seq_cls_chunk_pools_where_hf_does(bases):
    """A pad token id inside a sample: HF pools the rightmost non-pad id, not the last attended
    token; chunk alignment pools the same token. A pooled token on padding is refused."""
    model = _cls_model(bases("llama"), "llama", 2, 3)
    b = _cls_batch(3, 8, 4, torch.tensor([1, 0, 1]))
    b["input_ids"][2, 7] = 0  # attended, but the pad id: HF pools column 6 of row 2
    assert b["attention_mask"][2, 7] == 1
    case = separate([("a", model)], {"a": b}, alignment="chunk")
    case.check(chunk_size=3)
    bad = {**b, "attention_mask": b["attention_mask"].clone()}
    bad["attention_mask"][2, 5:] = 0  # pooled column 6 now lies on padding
    bad["input_ids"] = b["input_ids"].clone()
    with pytest.raises(muxc.BatchError, match=r"'a': row 2's last non-padding token \(column 6"):
        case.program.forward_backward({"a": bad})


# ------------------------------------------------------------- modules_to_save off the head

_COPIED = {  # (LoRA task's copies, IA3 task's copies): Linear/Conv1D and LayerNorm modules
    "llama": (["model.layers.0.mlp.up_proj"], ["model.layers.1.self_attn.o_proj"]),
    "gpt2": (["transformer.h.0.ln_1", "transformer.h.1.mlp.c_fc"], ["transformer.h.0.ln_2"]),
    "opt": (["model.decoder.layers.0.fc1", "model.decoder.layers.1.self_attn_layer_norm"],
            ["model.decoder.layers.0.final_layer_norm"]),
}


def _perturb_copies(model, seed: int) -> None:
    """Move the task's module copies off the frozen originals (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def copies_mixed(base, family: str, alignment: str) -> Case:
    lora_mods, ia3_mods = _COPIED[family]
    qv = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}[family]
    a = make_peft(base, LoraConfig(r=4, target_modules=qv, lora_dropout=0.0, modules_to_save=lora_mods), 1)
    b = make_peft(base, IA3Config(modules_to_save=ia3_mods), 2)
    for model, seed in ((a, 11), (b, 12)):
        _perturb_copies(model, seed)
    spec = [("copy", a), ("ia3copy", b),
            ("lora", make_peft(base, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0), 3))]
    batches = {"copy": make_batch(2, 7, 1), "ia3copy": make_batch(3, 5, 2), "lora": make_batch(2, 6, 3)}
    return separate(spec, batches, alignment=alignment)


@pytest.fixture(scope="module")
def copy_case(bases):
    return cached(lambda family, alignment: copies_mixed(bases(family), family, alignment))


@pytest.mark.parametrize("family,alignment", [
    ("gpt2", "chunk"),  # Llama's Linear copy runs in tests/test_kinds_mixed.py by default
    pytest.param("llama", "pad", marks=SLOW), pytest.param("llama", "chunk", marks=SLOW), pytest.param("gpt2", "pad", marks=SLOW),
    pytest.param("opt", "pad", marks=SLOW), pytest.param("opt", "chunk", marks=SLOW),
])
def test_modules_to_save_on_backbone_modules(copy_case, family, alignment):
    """A LoRA and an IA3 task each train their own copy of backbone Linear/Conv1D/LayerNorm
    modules (replacing the shared frozen op on their rows) beside a plain LoRA task."""
    c = copy_case(family, alignment)
    copies = [n for n in c.refs["copy"][1] if ".modules_to_save." in n]
    assert copies and (family == "llama" or any(n.endswith(".bias") for n in copies))  # Llama's have none
    kinds = {r.kind for recs in c.program.mux.sites.values() for r in recs}
    assert AdapterKind.COPY in kinds
    for fusion in FUSIONS:
        c.check(fusion=fusion, **({"chunk_size": 4} if alignment == "chunk" else {}))


def test_module_copies_save_loadable_by_peft(bases, copy_case, tmp_path):
    c = copy_case("gpt2", "chunk")
    c.program.save_adapters(tmp_path)
    for task, model in (("copy", c.models[0]), ("ia3copy", c.models[1])):
        loaded = PeftModel.from_pretrained(copy.deepcopy(bases("gpt2")), str(tmp_path / task))
        mine = {n: p for n, p in model.named_parameters() if ".modules_to_save." in n}
        theirs = dict(loaded.named_parameters())
        assert mine and all(torch.equal(theirs[n], p) for n, p in mine.items()), task


def test_modules_to_save_of_an_unsupported_module_is_refused(bases):
    model = make_peft(bases("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                 modules_to_save=["model.layers.0.input_layernorm"]), 1)
    with pytest.raises(muxc.UnsupportedPeftError, match=r"modules_to_save module .*input_layernorm.* "
                       r"\(LlamaRMSNorm\) is not the model's output head and not a module muxc copies"):
        muxc.compile([muxc.Task(name="a", model=model)])


@pytest.mark.parametrize("config", ["LoHaConfig", "LoKrConfig", "VeraConfig", "AdaLoraConfig",
                                    "OFTConfig", "BOFTConfig"])
def test_unsupported_kinds_are_named_with_what_is_supported(bases, config):
    import peft

    kwargs = {"AdaLoraConfig": dict(target_modules=["q_proj"], total_step=10),
              "OFTConfig": dict(target_modules=["q_proj"], r=4, oft_block_size=0),
              "BOFTConfig": dict(target_modules=["q_proj"], boft_block_size=4)}.get(
        config, dict(target_modules=["q_proj"]))
    model = peft.get_peft_model(copy.deepcopy(bases("llama")), getattr(peft, config)(**kwargs))
    ptype = model.peft_config["default"].peft_type.value
    with pytest.raises(muxc.UnsupportedPeftError, match=rf"PEFT type {ptype} is not supported; supported: "
                       r"LoRA .*DoRA .*IA3"):
        muxc.compile([muxc.Task(name="a", model=model)])


def test_heads_are_priced_by_the_cost_model(cls_case):
    """A task head is priced as its GEMM: per pooled row for SEQ_CLS, per token for an lm_head."""
    ops = {o.task: o for o in summarize_graph(cls_case("llama").program.mux).ops if o.node.endswith("[head]")}
    assert set(ops) == {"sst2", "multi", "reg", "lm_head"}
    assert ops["sst2"].forward.key.shape == (32, 2) and ops["multi"].forward.key.shape == (32, 3)
    assert ops["sst2"].forward.amount(b=3, s=7) == 3  # one pooled row each
    assert ops["lm_head"].forward.key.shape == (32, 96) and ops["lm_head"].forward.amount(b=2, s=8) == 16
    text = str(cls_case("llama").program.explain(cls_case("llama").batches))
    assert "sst2" in text and "lm_head" in text
