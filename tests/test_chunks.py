"""Chunk-based alignment: layout facts, and exact equivalence with isolated PEFT."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.ir.chunks import build_layout

CPU = torch.device("cpu")


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, 90, (n,), generator=g)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_layout_packs_without_inter_task_padding():
    batches = {"short": _batch([3, 5, 2, 6]), "long": _batch([17, 9, 12])}
    lay = build_layout(batches, ("short", "long"), chunk_size=4, device=CPU)
    assert lay.real_tokens == 16 + 38
    # each stream pads only to its next multiple of 4: at most 3 tokens per stream
    n_streams = sum(lay.streams.values())
    assert lay.tokens_computed - lay.real_tokens <= 3 * n_streams
    assert all(s.ids.shape[1] == 4 for s in lay.steps)
    # every step lays tasks out contiguously, in order
    for s in lay.steps:
        assert list(s.tasks) == [t for t in ("short", "long") if t in s.tasks]
        assert s.ids.shape[0] == sum(s.rows)
    # label counts equal HF's: shifted within each sample
    assert lay.label_counts == {"short": 16 - 4, "long": 38 - 3}


def test_layout_positions_restart_and_mask_separates_samples():
    lay = build_layout({"t": _batch([3, 2])}, ("t",), chunk_size=8, device=CPU)
    (step,) = lay.steps
    assert step.positions[0, :5].tolist() == [0, 1, 2, 0, 1]
    m = step.mask[0, 0]
    assert m[4, 3] and m[4, 4] and not m[4, 2]  # second sample sees only itself, causally
    assert not m[1, 2] and m[2, 0]
    assert all(m[i, i] for i in range(8))  # padding attends to itself only (no empty rows)


def test_layout_chunks_see_earlier_chunks_of_their_stream():
    lay = build_layout({"t": _batch([10])}, ("t",), chunk_size=4, device=CPU)
    assert len(lay.steps) == 3
    last = lay.steps[2]
    assert last.mask.shape == (1, 1, 4, 12)
    assert last.mask[0, 0, 0, :9].all() and not last.mask[0, 0, 0, 9:].any()
    assert last.gather.tolist() == [0]


def _matrix():
    """Full fusion x chunk-size matrix on Llama; a diagonal on GPT-2 and OPT (the rest is slow)."""
    cases = []
    diagonal = {("spatial", 3), ("temporal", 8), ("auto", 64)}
    for family in ("llama", "gpt2", "opt"):
        for fusion in ("spatial", "temporal", "auto"):
            for chunk in (3, 8, 64):  # 3 and 8 are shorter than the longest sample (12)
                fast = family == "llama" or (fusion, chunk) in diagonal
                marks = () if fast else (pytest.mark.slow,)
                cases.append(pytest.param(family, fusion, chunk, marks=marks, id=f"{family}-{fusion}-c{chunk}"))
    return cases


@pytest.mark.parametrize("family,fusion,chunk", _matrix())
def test_chunk_alignment_equals_isolated_peft(bases, family, fusion, chunk):
    base = bases(family)
    spec = [
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("lora8", make_peft(base, LoraConfig(r=8, use_rslora=True, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, IA3Config(), 3)),
    ]
    batches = {"lora": _batch([12, 4, 9], 1), "lora8": make_batch(2, 7, 2, pad_rows=2), "ia3": _batch([2, 3, 11, 5], 3)}
    refs = {n: isolated(m, batches[n]) for n, m in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                           muxc.Options(fusion=fusion, alignment="chunk", chunk_size=chunk, verify=True))
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)


def test_chunk_alignment_removes_padding(llama):
    models = [make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), i) for i in range(3)]
    tasks = [muxc.Task(name=f"t{i}", model=m) for i, m in enumerate(models)]
    batches = {"t0": _batch([10, 12, 30, 8]), "t1": _batch([40, 60, 45]), "t2": _batch([120, 70])}
    pad = muxc.compile(tasks, muxc.Options(fusion="spatial", alignment="pad")).explain(batches)
    chunk = muxc.compile(tasks, muxc.Options(fusion="spatial", alignment="chunk", chunk_size=16)).explain(batches)
    assert pad.padding["ineffective_token_fraction"] > 0.5
    assert chunk.padding["ineffective_token_fraction"] < 0.1
    assert chunk.padding["real tokens"] == pad.padding["real tokens"] == 395


def test_chunk_alignment_rejects_left_padding(llama):
    model = make_peft(llama, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0), 1)
    program = muxc.compile([muxc.Task(name="t", model=model)], muxc.Options(alignment="chunk", chunk_size=4))
    b = _batch([3, 5])
    b["attention_mask"] = b["attention_mask"].flip(1)
    with pytest.raises(muxc.BatchError, match="not right-padded"):
        program.forward_backward({"t": b})


def test_chunk_alignment_needs_sdpa(bases):
    model = make_peft(bases("bloom"), LoraConfig(r=4, target_modules=["query_key_value"], lora_dropout=0.0), 1)
    with pytest.raises(muxc.UnsupportedPeftError, match="alignment='chunk' needs scaled_dot_product_attention"):
        muxc.compile([muxc.Task(name="t", model=model)], muxc.Options(alignment="chunk"))
