"""Chunk-based alignment: layout facts, and exact equivalence with isolated PEFT.

(How much padding chunks remove on a non-uniform workload: tests/test_plan_explain.py.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import Case, separate
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


@pytest.mark.parametrize("chunk", [4, 7, 16, 33])
def test_planner_runs_match_the_built_layout(chunk):
    """The planner prices chunk sizes from sample lengths alone (`chunk_runs`): it must see
    exactly the steps, rows and kept-K/V lengths `build_layout` will make."""
    from muxc.plan.fusion import _layout_runs, chunk_runs, sample_lengths

    g = torch.Generator().manual_seed(chunk)
    batches = {f"t{i}": _batch(torch.randint(1, 40, (int(torch.randint(1, 6, (1,), generator=g)),),
                                             generator=g).tolist(), seed=i) for i in range(4)}
    lay = build_layout(batches, tuple(batches), chunk_size=chunk, device=CPU)
    planned = chunk_runs(sample_lengths(batches), chunk)
    built = _layout_runs(lay)
    assert [(dict(s.rows), s.seq_len, s.kv_len, n) for s, n in planned] == \
        [(dict(s.rows), s.seq_len, s.kv_len, n) for s, n in built]
    assert sum(s.padded_tokens for s, _ in planned) == lay.tokens_computed


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


@pytest.fixture(scope="module")
def case(bases):
    """family -> LoRA r4, rsLoRA r8 and IA3 tasks compiled once with alignment="chunk"; the
    fusion and the chunk size are run-time options, set per test with `Program.with_options`."""
    cache: dict[str, Case] = {}

    def get(family: str) -> Case:
        if family not in cache:
            base = bases(family)
            spec = [
                ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
                ("lora8", make_peft(base, LoraConfig(r=8, use_rslora=True, target_modules="all-linear",
                                                     lora_dropout=0.0), 2)),
                ("ia3", make_peft(base, IA3Config(), 3)),
            ]
            batches = {"lora": _batch([12, 4, 9], 1), "lora8": make_batch(2, 7, 2, pad_rows=2),
                       "ia3": _batch([2, 3, 11, 5], 3)}
            cache[family] = separate(spec, batches, alignment="chunk")
        return cache[family]

    return get


def _matrix():
    """A diagonal of the fusion x chunk-size matrix on Llama, GPT-2 (Conv1D) and Bloom (ALiBi) by
    default; the rest, and OPT, under -m slow (chunk alignment on Llama and OPT also runs in
    test_kinds_mixed.py, test_kinds_prefix.py, test_executor.py and test_recompute.py)."""
    cases = []
    diagonal = {("spatial", 3), ("temporal", 8), ("auto", 64)}
    for family in ("llama", "gpt2", "opt", "bloom"):
        for fusion in ("spatial", "temporal", "auto"):
            for chunk in (3, 8, 64):  # 3 and 8 are shorter than the longest sample (12)
                fast = family != "opt" and (fusion, chunk) in diagonal
                marks = () if fast else (pytest.mark.slow,)
                cases.append(pytest.param(family, fusion, chunk, marks=marks, id=f"{family}-{fusion}-c{chunk}"))
    return cases


@pytest.mark.parametrize("family,fusion,chunk", _matrix())
def test_chunk_alignment_equals_isolated_peft(case, family, fusion, chunk):
    case(family).check(fusion=fusion, chunk_size=chunk)


def test_chunk_alignment_rejects_left_padding(case):
    program = case("llama").program.with_options(chunk_size=4)
    b = _batch([3, 5])
    b["attention_mask"] = b["attention_mask"].flip(1)
    with pytest.raises(muxc.BatchError, match="not right-padded"):
        program.forward_backward({"lora": b})


def test_alibi_attention_becomes_chunk_attention_with_the_model_slopes(case):
    """Bloom's ALiBi attention (baddbmm) is rewritten to SDPA with the bias as its mask, and each
    layer's chunk node carries the slopes HF's own ALiBi tensor uses."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from muxc.ir import ChunkAttention

    program = case("bloom").program
    nodes = [n for n in program.mux.gm.graph.nodes if n.op == "call_function"]
    chunk = [n.target for n in nodes if isinstance(n.target, ChunkAttention)]
    assert len(chunk) == 2 and not any(n.target is torch.ops.aten.baddbmm.default for n in nodes)
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), 4, torch.float32)[:, 0, 1]
    assert all(c.alibi == tuple(hf.tolist()) for c in chunk)
    (rec,) = [r for r in program.history if r.name == "rewrite_attention"]
    assert "(2 from ALiBi attention, rewritten to SDPA with the bias as its mask)" in rec.summary


@pytest.mark.slow
def test_alibi_chunk_alignment_two_stages(bases):
    """Bloom with chunk alignment cut into two pipeline stages (run in one process)."""
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    spec = [("lora", make_peft(bases("bloom"), lora, 1)),
            ("ia3", make_peft(bases("bloom"), IA3Config(), 3))]
    c = separate(spec, {"lora": _batch([12, 4, 9], 1), "ia3": _batch([2, 3, 11, 5], 3)},
                 alignment="chunk", stages=2)
    for fusion in ("spatial", "temporal", "auto"):
        c.check(fusion=fusion, chunk_size=4)


def test_alibi_that_is_not_slope_times_position_is_refused():
    """`alibi_slopes` checks the bias it reads is slope * key position before chunks rebuild it."""
    import torch.fx as fx

    from muxc.passes.alibi_attention import alibi_slopes

    g = fx.Graph()
    am = g.placeholder("attention_mask")
    x = g.call_function(torch.ops.aten._to_copy.default, (am,), {"dtype": torch.float32})
    sq = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))  # 2 everywhere: not slope * position
    bias = g.call_function(torch.ops.aten.unsqueeze.default, (sq, 1))
    g.output(bias)
    with pytest.raises(muxc.UnsupportedPeftError, match="is not slope \\* key position"):
        alibi_slopes(g, bias, heads=1)
