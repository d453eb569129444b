"""Prefix tuning (PEFT ``PrefixTuningConfig``) in muxc: per-task trained K/V at every attention.

Two prefix tasks (one with ``prefix_projection``, its MLP encoder; one a plain embedding, of
another length) run beside a LoRA and an IA3 task on one backbone. Each (family, alignment) is
compiled once per module and run under every fusion through `Program.with_options`; every task
must match isolated HF PEFT (loss and every trainable parameter's grad, `helpers.REL_TOL`).
Default runs keep OPT (auto fusion, micro-batches, pricing; Llama runs in test_kinds_mixed.py);
the rest is ``-m slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Case, cached, rel_err, separate
from models import _cfg, make_batch, make_peft
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig

import muxc
from muxc.errors import UnsupportedPeftError
from muxc.ir import PrefixAttention, prefix_kv
from muxc.ir.prefix import task_positions
from muxc.plan.summary import summarize_graph

SLOW = pytest.mark.slow


def _prefix(base, seed: int, n: int, projection: bool):
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                             prefix_projection=projection, encoder_hidden_size=24)
    return make_peft(base, cfg, seed)


def prefix_mixed(base, alignment: str = "pad") -> Case:
    spec = [
        ("proj", _prefix(base, 1, 3, True)),
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("plain", _prefix(base, 3, 5, False)),
        ("ia3", make_peft(base, IA3Config(), 4)),
    ]
    batches = {"proj": make_batch(3, 9, 1, pad_rows=2), "lora": make_batch(2, 7, 2),
               "plain": make_batch(3, 6, 3), "ia3": make_batch(1, 5, 4)}
    return separate(spec, batches, alignment=alignment)


@pytest.fixture(scope="module")
def case(bases):
    return cached(lambda family, alignment="pad": prefix_mixed(bases(family), alignment))


# by default OPT (positions from the mask's cumsum) under auto fusion (Llama's prefix task runs
# in test_kinds_mixed.py: spatial/temporal pad, auto chunk); the rest under -m slow (tracing
# dominates the cost)
CELLS = [pytest.param("llama", "spatial", marks=SLOW), pytest.param("llama", "temporal", marks=SLOW),
         pytest.param("llama", "auto", marks=SLOW),  # llama: by default in test_kinds_mixed.py
         ("opt", "auto"),
         pytest.param("gpt2", "temporal", marks=SLOW),
         pytest.param("gpt2", "spatial", marks=SLOW), pytest.param("gpt2", "auto", marks=SLOW),
         pytest.param("opt", "spatial", marks=SLOW), pytest.param("opt", "temporal", marks=SLOW)]


@pytest.mark.parametrize(("family", "fusion"), CELLS)
def test_prefix_mixed_with_lora_and_ia3_pad(case, family, fusion):
    case(family).check(fusion=fusion)


# chunk alignment: samples packed several to a stream, each seeing its task's prefix; chunk
# sizes 4 (a 9-token sample spans three chunks) and 8
CHUNK_CELLS = [pytest.param("llama", "auto", 4, marks=SLOW),  # by default in test_kinds_mixed.py
               pytest.param("llama", "spatial", 8, marks=SLOW),
               pytest.param("llama", "temporal", 4, marks=SLOW),
               pytest.param("gpt2", "auto", 4, marks=SLOW), pytest.param("gpt2", "spatial", 8, marks=SLOW),
               pytest.param("opt", "auto", 4, marks=SLOW), pytest.param("opt", "temporal", 8, marks=SLOW)]


@pytest.mark.parametrize(("family", "fusion", "chunk"), CHUNK_CELLS)
def test_prefix_mixed_with_lora_and_ia3_chunk(case, family, fusion, chunk):
    case(family, "chunk").check(fusion=fusion, chunk_size=chunk)


@SLOW
@pytest.mark.parametrize("alignment", ["pad", "chunk"])
def test_prefix_on_eager_attention(alignment):
    """HF's eager attention is rewritten to SDPA first, then given the prefixes."""
    cfg, cls = _cfg("llama")
    torch.manual_seed(0)
    base = cls._from_config(cfg, attn_implementation="eager").eval()
    c = prefix_mixed(base, alignment)
    assert any(isinstance(n.target, PrefixAttention) for n in c.program.mux.gm.graph.nodes)
    c.check(fusion="spatial")


def test_prefix_micro_batches(case):
    case("opt").check(fusion="spatial", micro_batches=2)


def test_every_attention_node_serves_both_prefix_tasks(case):
    mux = case("opt").program.mux
    nodes = [n for n in mux.gm.graph.nodes if isinstance(n.target, PrefixAttention)]
    assert [n.target.index for n in nodes] == [0, 1]  # the tiny models have 2 layers
    assert all([r.task for r in n.target.records] == ["proj", "plain"] for n in nodes)
    assert all(n.target.layers == 2 for n in nodes)
    assert "position_ids" in mux.input_names()  # the prefix tasks' positions follow their prefix


def test_prefix_kv_is_peft_layout(bases):
    """Layer l's K/V are what PEFT's get_prompt puts in the cache for layer l (GQA: the
    key/value head count)."""
    model = _prefix(copy.deepcopy(bases("llama")), 5, 4, True)
    enc = model.prompt_encoder["default"]
    cache = model.get_prompt(batch_size=1)
    params = {"embedding": enc.embedding.weight, "w1": enc.transform[0].weight,
              "b1": enc.transform[0].bias, "w2": enc.transform[2].weight, "b2": enc.transform[2].bias}
    for layer in range(2):
        k, v = prefix_kv(params, layer, 2, head_dim=8)
        assert k.shape == (2, 4, 8)  # 2 key/value heads of the 4 query heads
        assert rel_err(k, cache.layers[layer].keys[0]) <= 1e-6
        assert rel_err(v, cache.layers[layer].values[0]) <= 1e-6


def test_positions_follow_the_prefix():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert task_positions("llama", mask, 3).tolist() == [[3, 4, 5, 6]] * 2
    assert task_positions("opt", mask, 3).tolist() == [[3, 4, 5, -1], [3, 4, -1, -1]]
    assert task_positions("opt", mask, 0).tolist() == [[0, 1, 2, -1], [0, 1, -1, -1]]


def test_prefix_is_priced(case):
    """Each prefix task pays n more key columns per attention call and, with
    prefix_projection, its encoder slice per layer; the plain embedding pays no GEMM."""
    ops = summarize_graph(case("opt").program.mux).ops
    extra = {o.task: o.forward.amount for o in ops if o.node == f"prefix_attention_0[{o.task}]"}
    assert extra["proj"](1, 1) == 4 * 3 and extra["plain"](1, 1) == 4 * 5  # heads * n per token
    enc = [o.task for o in ops if ":enc" in o.node]
    assert enc and set(enc) == {"proj"}


def test_prefix_alone_trains_saves_and_checkpoints(bases, tmp_path):
    """A prefix task alone equals PEFT; after a step its adapter saves in PEFT format (which
    from_pretrained loads to the same logits) and its checkpoint restores its parameters."""
    model = _prefix(copy.deepcopy(bases("llama")), 7, 3, True)
    batches = {"p": make_batch(2, 6, 7)}
    c = separate([("p", model)], batches)
    c.check()
    c.program.step(batches)
    c.program.save_checkpoint(tmp_path / "ckpt")
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".default." in n for n in params)
    c.program.save_adapters(tmp_path / "adapters")
    batch = make_batch(2, 7, 99)
    loaded = PeftModel.from_pretrained(copy.deepcopy(bases("llama")), str(tmp_path / "adapters" / "p"))
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rel_err(got, want) <= 1e-6
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    c.program.load_checkpoint(tmp_path / "ckpt")
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], params[n]) for n in params)


@SLOW
def test_prefix_across_pipeline_stages_in_one_process(bases):
    """With stages in one process every stage reads the same encoder parameters: their
    gradients add up over the stages' layers, as in PEFT."""
    spec = [("p", _prefix(copy.deepcopy(bases("llama")), 8, 3, True)),
            ("l", make_peft(bases("llama"), LoraConfig(r=2, target_modules="all-linear"), 9))]
    c = separate(spec, {"p": make_batch(2, 7, 8), "l": make_batch(3, 5, 9)}, stages=2)
    assert len(c.program.partitioned.stages) == 2
    c.check(fusion="spatial")
    c.check(fusion="temporal", micro_batches=2)


def test_prefix_refuses_stages_on_several_processes(bases, monkeypatch):
    """Stage ranks would each hold part of the encoder's gradient: refused with the remedy."""
    monkeypatch.setattr(muxc.api, "join_stage_group", lambda *a: object())  # as if under torchrun
    model = _prefix(copy.deepcopy(bases("llama")), 8, 2, False)
    lora = make_peft(bases("llama"), LoraConfig(r=2, target_modules=["q_proj"]), 9)  # stages cut at sites
    with pytest.raises(UnsupportedPeftError, match=r"task\(s\) \['p'\]: prefix tuning with stages on "
                       r"several processes is not supported yet.*in one process"):
        muxc.compile([muxc.Task(name="p", model=model), muxc.Task(name="l", model=lora)],
                     muxc.Options(stages=2))


def test_prefix_refuses_unknown_position_rules(bases):
    """A family whose positions after a prefix muxc does not know is refused, naming it."""
    model = _prefix(bases("bloom"), 8, 2, False)
    with pytest.raises(UnsupportedPeftError, match=r"prefix tuning on 'bloom' models is not supported yet"):
        muxc.compile([muxc.Task(name="p", model=model)])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gpt_neox", "phi", "stablelm",
                                    "gpt_bigcode"])
def test_prefix_on_other_families(bases, family):
    """The "arange" families: a prefix task (projection MLP) beside a LoRA task, pad and chunk."""
    base = bases(family)
    spec = [("pre", _prefix(base, 1, 3, True)),
            ("lora", make_peft(base, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0), 2))]
    batches = {"pre": make_batch(2, 7, 1), "lora": make_batch(2, 5, 2)}
    for alignment in ("pad", "chunk"):
        c = separate(spec, batches, alignment=alignment)
        for fusion in ("spatial", "temporal"):
            c.check(fusion=fusion)


def test_prefix_refuses_other_task_types(bases):
    cfg = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    from transformers import LlamaForSequenceClassification

    base = bases("llama")
    torch.manual_seed(0)
    model = make_peft(LlamaForSequenceClassification(base.config), cfg, 1, copy_base=False)
    with pytest.raises(UnsupportedPeftError, match=r"task_type='SEQ_CLS'"):
        muxc.compile([muxc.Task(name="cls", model=model)])


def test_prefix_attention_op_leaves_other_rows_alone():
    """Direct check of the op: a prefix task's rows attend to ``[P; K]`` with the prefix
    columns open (a causal flag becomes the same mask), other rows are plain SDPA bit for bit."""
    from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch, MuxBatch

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, s, n, layers = 4, 2, 8, 5, 3, 2
    emb = torch.randn(n, layers * 2 * kv_heads * d, generator=g)
    rec = AdapterRecord(task="a", site="prompt_encoder.default", kind=AdapterKind.PREFIX,
                        dispatch=Dispatch.ATTENTION, aggregate=Aggregate.PREFIX_KV,
                        params={"embedding": emb}, param_names={"embedding": "e"}, rank=n)
    q, k, v = (torch.randn(3, heads, s, d, generator=g) for _ in range(3))
    mux = MuxBatch(tasks=("a", "b"), rows=(2, 1), seq_len=s, labels=())
    op = PrefixAttention(1, layers, (rec,))
    out = op(mux, emb, query=q, key=k, value=v, is_causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(out[2:], sdpa(q[2:], k[2:], v[2:], is_causal=True))
    pk, pv = prefix_kv({"embedding": emb}, 1, layers, d)
    pk, pv = (x.repeat_interleave(2, 0).expand(2, -1, -1, -1) for x in (pk, pv))
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(s, n, dtype=torch.bool), causal], dim=1)
    want = sdpa(q[:2], torch.cat([pk, k[:2]], 2), torch.cat([pv, v[:2]], 2), attn_mask=mask)
    assert rel_err(out[:2], want) <= 1e-6
    assert rel_err(out[:2], sdpa(q[:2], k[:2], v[:2], is_causal=True)) > 1e-2  # the prefix matters
