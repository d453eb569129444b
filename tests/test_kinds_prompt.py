"""Prompt tuning and P-tuning (`muxc.kinds.prompt`): virtual tokens on a shared backbone.

Each (family, alignment) mix is compiled once per module and run under every fusion through
`Program.with_options`; every task must match isolated HF PEFT (loss and the grad of every
parameter PEFT trains: the prompt embedding, the P-tuning MLP/LSTM encoder, LoRA, IA3;
`helpers.REL_TOL`). "Alone" runs a step with only that task's batch in the mixed program.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import Case, adapter_grads, assert_matches, cached, isolated, rel_err
from models import build_base, make_batch, make_peft
from peft import IA3Config, LoraConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig

import muxc
from muxc.errors import UnsupportedPeftError
from muxc.ir import AdapterKind

SLOW = pytest.mark.slow
_LORA = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}
_IA3 = {"gpt2": (["c_attn", "c_fc"], ["c_fc"]), "llama": (["k_proj", "down_proj"], ["down_proj"]),
        "opt": (["k_proj", "fc2"], ["fc2"])}


def _prompt(n: int = 3):
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


def _mlp(n: int = 4):
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=16)


def _lstm(n: int = 2):
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=8,
                               encoder_reparameterization_type="LSTM", encoder_num_layers=2)


def mixed(family: str, alignment: str) -> Case:
    """Prompt tuning, P-tuning (MLP; LSTM on GPT-2), LoRA and IA3 tasks on one base."""
    base = build_base(family)
    ia3_targets, ff = _IA3[family]
    spec = [
        ("prompt", make_peft(base, _prompt())),
        ("mlp", make_peft(base, _mlp())),
        ("lora", make_peft(base, LoraConfig(r=4, target_modules=_LORA[family]), 3)),
        ("ia3", make_peft(base, IA3Config(target_modules=ia3_targets, feedforward_modules=ff), 4)),
    ]
    batches = {"prompt": make_batch(3, 7, 1, pad_rows=2), "mlp": make_batch(2, 5, 2),
               "lora": make_batch(2, 9, 3), "ia3": make_batch(2, 6, 4)}
    if family == "gpt2":
        spec.append(("lstm", make_peft(base, _lstm())))
        batches["lstm"] = make_batch(2, 6, 5)
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(verify=True, alignment=alignment))
    return Case(program, batches, refs, lambda n: adapter_grads(models[n], "default"), list(models.values()))


@pytest.fixture(scope="module")
def case():
    return cached(lambda family, alignment="pad": mixed(family, alignment))


def _check(c: Case, batches: dict, **options) -> None:
    """``batches`` (any subset of the case's tasks, any shapes) against fresh references."""
    models = dict(zip(c.refs, c.models))
    refs = {n: isolated(models[n], b) for n, b in batches.items()}
    c.zero_grad()
    losses = c.program.with_options(**options).forward_backward(batches)
    assert set(losses) == set(batches)
    assert_matches(losses, c.grads, refs)
    c.zero_grad()


# by default spatial on GPT-2 (pad, with the LSTM encoder); Llama's prompt and P-tuning tasks run in
# test_kinds_mixed.py (spatial/temporal pad, auto chunk); the rest under -m slow
PAD = [("gpt2", "spatial"), pytest.param("gpt2", "temporal", marks=SLOW),
       pytest.param("gpt2", "auto", marks=SLOW), pytest.param("llama", "spatial", marks=SLOW),
       pytest.param("llama", "temporal", marks=SLOW), pytest.param("llama", "auto", marks=SLOW),
       pytest.param("opt", "spatial", marks=SLOW), pytest.param("opt", "temporal", marks=SLOW),
       pytest.param("opt", "auto", marks=SLOW)]
# llama's prompt and P-tuning tasks run in auto/chunk in tests/test_kinds_mixed.py by default
CHUNK = [pytest.param(f, marks=SLOW) for f in ("gpt2", "llama", "opt")]


@pytest.mark.parametrize(("family", "fusion"), PAD)
def test_mixed_pad(case, family, fusion):
    case(family).check(fusion=fusion)


@pytest.mark.parametrize("family", CHUNK)
def test_mixed_chunk(case, family):
    """Chunks shorter than a sample: virtual tokens sit at each packed sample's start, wherever
    that falls in a chunk."""
    c = case(family, "chunk")
    c.check(fusion="auto")
    c.check(fusion="spatial", chunk_size=4)


@SLOW
@pytest.mark.parametrize("family", ["gemma", "bloom"])
def test_other_families(family):
    """Gemma scales inputs_embeds inside the model (after the site: PEFT's prompts are scaled
    too); Bloom uses ALiBi (pad alignment)."""
    base = build_base(family)
    spec = [("prompt", make_peft(base, _prompt())), ("mlp", make_peft(base, _mlp()))]
    batches = {"prompt": make_batch(3, 7, 1), "mlp": make_batch(2, 5, 2)}
    refs = {n: isolated(m, batches[n]) for n, m in spec}
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec])
    models = dict(spec)
    assert_matches(program.forward_backward(batches), lambda n: adapter_grads(models[n], "default"), refs)


@pytest.mark.parametrize("task", ["prompt", "mlp", pytest.param("lstm", marks=SLOW)])
def test_alone(case, task):
    c = case("gpt2")
    _check(c, {task: c.batches[task]}, fusion="spatial")


@SLOW  # the llama chunk compile; prompt tasks in chunk steps run in test_kinds_mixed.py
def test_prompt_tasks_alone_in_chunk_steps(case):
    c = case("llama", "chunk")
    _check(c, {"prompt": c.batches["prompt"], "mlp": c.batches["mlp"]}, fusion="spatial", chunk_size=8)


def test_left_padding_and_micro_batches(case):
    """Virtual tokens come before a row's left padding (PEFT's order); OPT's positions then
    count only attended tokens. Micro-batches split the rows, not the columns."""
    c = case("opt")
    b = make_batch(3, 7, 11, pad_rows=0)
    b["attention_mask"][0, :2] = 0
    b["input_ids"][0, :2] = 0
    b["labels"][0, :2] = -100
    _check(c, {"prompt": b, "mlp": make_batch(4, 3, 12), "lora": c.batches["lora"]},
           fusion="spatial", micro_batches=2)


def test_first_label_trains_the_prompt(case):
    """A label at position 0 predicts nothing alone, but after virtual tokens it is predicted
    from the last one: the task is not left out and matches PEFT."""
    c = case("gpt2")
    b = make_batch(2, 4, 13, pad_rows=0)
    b["labels"][:, 1:] = -100
    _check(c, {"mlp": b}, fusion="temporal")


def test_evaluate_matches_peft(case):
    c = case("gpt2")
    models = dict(zip(c.refs, c.models))
    got = c.program.evaluate({n: c.batches[n] for n in ("prompt", "lstm")})
    for name in ("prompt", "lstm"):
        with torch.no_grad():
            want = models[name](**c.batches[name]).loss
        assert rel_err(got[name], want) <= 1e-5, name


def test_site_and_plan_see_virtual_tokens(case):
    """One site after the word embedding holds both prompt kinds; plans count virtual tokens as
    real tokens (each prompt row is n longer)."""
    c = case("gpt2")
    sites = c.program.mux.sites
    assert [r.kind for r in sites["transformer.wte"]] == [AdapterKind.PROMPT, AdapterKind.P_TUNING,
                                                          AdapterKind.P_TUNING]
    real = sum(int(b["attention_mask"].sum()) for b in c.batches.values())
    virtual = 3 * 3 + 4 * 2 + 2 * 2  # virtual tokens x rows of prompt, mlp, lstm
    plan = c.program.with_options(fusion="temporal").plan(c.batches)
    assert plan.real_tokens == real + virtual
    longest = {"prompt": 7 + 3, "mlp": 5 + 4, "lstm": 6 + 2, "lora": 9, "ia3": 6}
    assert plan.tokens_computed == sum(c.batches[t]["input_ids"].shape[0] * s for t, s in longest.items())


def test_cost_model_prices_the_encoder(case):
    """The embedding site costs each prompt task a per-token select over the hidden width; the
    P-tuning encoder adds per-call GEMM work (prompt tuning none); trainable sizes are exact
    for prompt tuning."""
    from muxc.plan.ops import OpKind
    from muxc.plan.summary import summarize_graph

    c = case("gpt2")
    summary = summarize_graph(c.program.mux)
    at = [op for op in summary.ops if op.site and "wte" in op.site]
    per_token = {op.task for op in at if op.forward.key.kind is OpKind.IA3}
    gemms = {op.task for op in at if op.forward.key.kind is OpKind.GEMM}
    assert per_token == {"prompt", "mlp", "lstm"} and gemms == {"mlp", "lstm"}
    assert summary.adapter_numel["prompt"] == 3 * 32
    assert summary.adapter_numel["mlp"] == sum(p.numel() for p in c.models[1].parameters() if p.requires_grad)
    # the encoder's GEMMs at its own widths (every weight matrix after the embedding, over
    # the virtual rows, forward, dX and dW), and no DoRA-style weight-norm pass
    (rec,) = [r for r in c.program.mux.sites["transformer.wte"] if r.task == "mlp"]
    mats = [w for w in list(rec.params.values())[1:] if w.dim() == 2]
    got = sorted((op.forward.key.shape, op.forward.amount(1, 1)) for op in at
                 if op.task == "mlp" and op.forward.key.kind is OpKind.GEMM)
    assert got == sorted(((w.shape[1], w.shape[0]), 3.0 * rec.rank) for w in mats)
    assert all(":call_gemm" in op.node for op in at if op.forward.key.kind is OpKind.GEMM)
    assert not [op for op in at if op.forward.key.kind is OpKind.ELEMENTWISE]


def test_save_round_trip_loads_in_peft(case, tmp_path):
    """save_adapters writes PEFT's format (prompt_embeddings: the encoder's output);
    PeftModel.from_pretrained gives the trained model's logits."""
    c = case("gpt2")
    c.program.save_adapters(tmp_path)
    b = c.batches["mlp"]
    for name in ("prompt", "mlp", "lstm"):
        model = dict(zip(c.refs, c.models))[name]
        loaded = PeftModel.from_pretrained(build_base("gpt2"), str(tmp_path / name))
        with torch.no_grad():
            want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6, name


def test_checkpoint_carries_the_encoder(tmp_path):
    """A checkpoint restores every P-tuning encoder parameter (not only PEFT's saved output)."""
    base = build_base("gpt2")
    model = make_peft(base, _mlp())
    program = muxc.compile([muxc.Task(name="p", model=model)])
    batch = {"p": make_batch(2, 5, 1)}
    program.step(batch)
    program.save_checkpoint(tmp_path / "c")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mlp_head." in n for n in saved)
    program.step(batch)
    assert any(not torch.equal(p, saved[n]) for n, p in model.named_parameters() if n in saved)
    program.load_checkpoint(tmp_path / "c")
    for n, p in model.named_parameters():
        if n in saved:
            assert torch.equal(p, saved[n]), n


def test_refused_with_reasons():
    base = build_base("gpt2")
    lstm = make_peft(base, PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=8,
        encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.1))
    with pytest.raises(UnsupportedPeftError, match=r"encoder_dropout=0.1 between LSTM layers"):
        muxc.compile([muxc.Task(name="a", model=lstm)])
    cls = T.GPT2ForSequenceClassification(T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96,
                                                       pad_token_id=0))
    seq = make_peft(cls, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2), copy_base=False)
    with pytest.raises(UnsupportedPeftError, match=r"task_type='SEQ_CLS'"):
        muxc.compile([muxc.Task(name="b", model=seq)])


def test_two_prompt_adapters_of_one_model(fresh_templates):
    """Two tasks on one model's two P-tuning adapters (one word embedding, an encoder each):
    the second re-binds the first's export to its own encoder and both match PEFT."""
    model = make_peft(build_base("gpt2"), _mlp(2))
    model.add_adapter("second", _mlp(2))
    batches = {"a": make_batch(2, 5, 1), "b": make_batch(2, 4, 2)}
    adapters = {"a": "default", "b": "second"}
    refs = {n: isolated(model, batches[n], a) for n, a in adapters.items()}
    program = muxc.compile([muxc.Task(name=n, model=model, adapter_name=a) for n, a in adapters.items()])
    assert "1 exported, 1 re-bound" in program.history[1].summary
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: adapter_grads(model, adapters[n]), refs)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_encoder_and_trace_op_match_peft(encoder):
    """`encode` gives PEFT's PromptEncoder output from its parameters alone, and the single-task
    trace op (first n columns replaced) has PEFT's values and gradients."""
    from peft.tuners.p_tuning.model import PromptEncoder

    from muxc.kinds.prompt import encode, ptuning_replace

    torch.manual_seed(0)
    enc = PromptEncoder(PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=8, encoder_hidden_size=5,
        encoder_reparameterization_type=encoder, encoder_num_layers=2, num_transformer_submodules=1))
    params = list(enc.parameters())
    want = enc(torch.arange(3)[None])
    assert rel_err(encode(params), want[0]) <= 1e-6
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2, 5, 8)
    got = torch.autograd.grad((ptuning_replace(h, params, "s") * w).sum(), [h, *params])
    ref = torch.autograd.grad((torch.cat([want.expand(2, 3, 8), h[:, 3:]], 1) * w).sum(), [h, *params])
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5


@SLOW  # re-binding a prompt export runs by default in test_two_prompt_adapters_of_one_model
def test_add_and_remove_prompt_tasks():
    """add_task re-binds a known prompt structure (no new export); remove_task keeps the rest
    exact."""
    base = build_base("llama")
    models = {"lora": make_peft(base, LoraConfig(r=2, target_modules=["q_proj"])),
              "p1": make_peft(base, _mlp(3)), "p2": make_peft(base, _mlp(3), seed=5)}
    batches = {"lora": make_batch(2, 6, 1), "p1": make_batch(2, 5, 2), "p2": make_batch(3, 4, 3)}
    refs = {n: isolated(m, batches[n]) for n, m in models.items()}
    program = muxc.compile([muxc.Task(name="lora", model=models["lora"])])
    program.add_task(muxc.Task(name="p1", model=models["p1"]))
    program.add_task(muxc.Task(name="p2", model=models["p2"]))
    assert program.history[1].summary.startswith("0 exported, 3 re-bound")
    grads = lambda n: adapter_grads(models[n], "default")  # noqa: E731
    assert_matches(program.forward_backward(batches), grads, refs)
    for m in models.values():
        m.zero_grad(set_to_none=True)
    program.remove_task("p1")
    kept = {n: batches[n] for n in ("lora", "p2")}
    assert_matches(program.forward_backward(kept), grads, {n: refs[n] for n in kept})


@SLOW
@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_two_stages_in_one_process(alignment):
    """The embedding site sits in stage 0; the encoder's gradient comes back from stage 1."""
    base = build_base("llama")
    spec = [("prompt", make_peft(base, _prompt())), ("mlp", make_peft(base, _mlp())),
            ("lora", make_peft(base, LoraConfig(r=4, target_modules=["q_proj"]), 3))]
    batches = {"prompt": make_batch(3, 7, 1), "mlp": make_batch(2, 5, 2), "lora": make_batch(2, 6, 3)}
    refs = {n: isolated(m, batches[n]) for n, m in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(stages=2, alignment=alignment, recompute="layers"))
    extra = dict(micro_batches=2) if alignment == "pad" else dict(chunk_size=4)
    runs = [dict(fusion="spatial", **extra), dict(fusion="temporal")]
    for options in runs:
        losses = program.with_options(**options).forward_backward(batches)
        assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)
        for m in models.values():
            m.zero_grad(set_to_none=True)
