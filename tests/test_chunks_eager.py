"""Chunk alignment on models loaded with ``attn_implementation="eager"``: the eager attention
pattern is recognised and rewritten to SDPA, then made chunk-aware; exact vs isolated PEFT."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
import torch.fx as fx
from helpers import separate
from models import CORE_FAMILIES, OTHER_FAMILIES, _cfg, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.ir import SDPA, ChunkAttention
from muxc.passes.eager_attention import match_eager_attention, sdpa_from_eager, unmatched_attention

# what each family's attention is rewritten from (Bloom's ALiBi baddbmm; the others' eager form)
REWRITTEN_FROM = {"bloom": "ALiBi attention, rewritten to SDPA with the bias as its mask"}


def eager_base(family: str) -> torch.nn.Module:
    cfg, cls = _cfg(family)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    return model


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, 90, (n,), generator=g)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _ia3(family: str) -> IA3Config:
    if family == "stablelm":  # PEFT has no IA3 default targets for it
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return IA3Config()


_CACHE: dict = {}


def eager_case(family: str):
    """LoRA and IA3 tasks on the eager ``family`` model, compiled once with chunk alignment."""
    if family not in _CACHE:
        base = eager_base(family)
        spec = [
            ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
            ("ia3", make_peft(base, _ia3(family), 3)),
        ]
        batches = {"lora": _batch([12, 4, 9], 1), "ia3": make_batch(2, 7, 2, pad_rows=2)}
        _CACHE[family] = separate(spec, batches, alignment="chunk")
    return _CACHE[family]


def _params(families, fast):
    return [pytest.param(f, marks=() if f in fast else (pytest.mark.slow,), id=f) for f in families]


SUPPORTED = list(CORE_FAMILIES + OTHER_FAMILIES)


@pytest.mark.parametrize("family", _params(SUPPORTED, ("llama",)))  # gpt2, opt, ...: -m slow
@pytest.mark.parametrize("fusion,chunk", [("spatial", 3), ("auto", 8)])
def test_eager_chunk_alignment_equals_isolated_peft(family, fusion, chunk):
    case = eager_case(family)
    case.check(fusion=fusion, chunk_size=chunk)


@pytest.mark.parametrize("family", _params(SUPPORTED, ("llama",)))
def test_eager_attention_becomes_chunk_attention_per_layer(family):
    program = eager_case(family).program
    layers = 2  # tests/models.py builds every family with two layers
    softmax = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
    nodes = [n for n in program.mux.gm.graph.nodes if n.op == "call_function"]
    assert sum(isinstance(n.target, ChunkAttention) for n in nodes) == layers
    assert not any(n.target is SDPA or n.target in softmax for n in nodes)
    (rec,) = [r for r in program.history if r.name == "rewrite_attention"]
    why = REWRITTEN_FROM.get(family, "eager attention, rewritten to SDPA first")
    assert f"({layers} from {why})" in rec.summary


def test_match_reads_scale_mask_and_dropout():
    """On the pad-aligned graph (eager attention as exported): one match per layer, scale
    1/sqrt(head_dim), the additive mask kept; after the rewrite nothing is left unmatched."""
    model = make_peft(eager_base("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 1)
    program = muxc.compile([muxc.Task(name="t", model=model)], muxc.Options(alignment="pad"))
    graph = program.mux.gm.graph
    matches = match_eager_attention(graph)
    assert len(matches) == 2
    for m in matches:
        assert m.scale == pytest.approx(8 ** -0.5) and m.dropout_p == 0.0
        assert m.mask is not None and m.out.target is torch.ops.aten.matmul.default
    assert len(unmatched_attention(graph)) == 2  # before the rewrite: both are attention
    copy = fx.GraphModule(program.mux.gm, deepcopy(graph)).graph
    assert sdpa_from_eager(copy) == 2 and unmatched_attention(copy) == []
    assert len(match_eager_attention(graph)) == 2  # the original is left as it was
