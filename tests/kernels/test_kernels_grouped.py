"""The grouped torch path (the CPU default) against the fp64 per-task reference loop."""

import pytest
import torch
from torch.profiler import profile

from muxc.kernels import grouped, multi_ia3, multi_lora
from muxc.kernels.ia3 import multi_ia3_bwd_ref, multi_ia3_ref
from muxc.kernels.lora import multi_lora_bwd_ref, multi_lora_ref, segments_for

F64 = torch.float64
# (seg_lens, ranks, scaling): one task, many tasks, odd sizes, mixed ranks, rank 0 between
# tasks of a run, empty segments (with and without an adapter), negative and zero scaling.
LAYOUTS = {
    "one-task": ([7], [3], [2.0]),
    "one-task-rank0": ([5], [0], [1.0]),
    "two": ([3, 4], [1, 5], [0.5, -1.5]),
    "mixed": ([6, 0, 9, 1, 0, 4], [4, 2, 0, 1, 0, 8], [2.0, 1.0, 0.5, 3.0, 1.0, 0.0]),
    "sixteen": ([3, 0, 5, 1, 0, 9, 2, 2, 7, 0, 4, 4, 1, 6, 8, 3],
                [1, 4, 8, 16, 64, 0, 4, 1, 8, 16, 1, 4, 64, 8, 0, 2],
                [0.5 + i % 4 for i in range(16)]),
    "long-high-rank": ([300, 257], [64, 48], [2.0, 0.25]),
    "all-rank0": ([2, 3], [0, 0], [1.0, 1.0]),
    "no-tokens": ([0, 0], [4, 2], [1.0, 1.0]),
}


def _make(lens, ranks, k=33, n=17, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), k, generator=g, dtype=dtype)
    a = [torch.randn(r, k, generator=g, dtype=dtype) for r in ranks]
    b = [torch.randn(n, r, generator=g, dtype=dtype) for r in ranks]
    base = torch.randn(sum(lens), n, generator=g, dtype=dtype)
    return x, a, b, base


def _gemms(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base+delta"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_backward_equal_fp64_reference(name, with_base):
    lens, ranks, scaling = LAYOUTS[name]
    x, a, b, base = _make(lens, ranks)
    leaves = [x, *a, *b] + ([base] if with_base else [])
    for t in leaves:
        t.requires_grad_()
    before = grouped.calls()
    y = multi_lora(x, lens, a, b, scaling, base=base if with_base else None)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    y.backward(dy)
    after = grouped.calls()
    # The grouped path served the forward and the backward (CPU default).
    assert after["multi_lora"] - before.get("multi_lora", 0) == 1
    assert after["multi_lora_bwd"] - before.get("multi_lora_bwd", 0) == 1

    segs = segments_for(tuple(lens))
    xd, ad, bd = x.detach(), [t.detach() for t in a], [t.detach() for t in b]
    y_ref = multi_lora_ref(xd, segs, ad, bd, scaling, base.detach() if with_base else None)
    dx_ref, da_ref, db_ref = multi_lora_bwd_ref(dy, xd, segs, ad, bd, scaling)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-12, atol=1e-12)
    for i in range(len(lens)):
        torch.testing.assert_close(a[i].grad, da_ref[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b[i].grad, db_ref[i], rtol=1e-12, atol=1e-12)
        if lens[i] == 0:
            assert not a[i].grad.any() and not b[i].grad.any()
    if with_base:
        assert torch.equal(base.grad, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_accumulates_in_fp32(dtype):
    lens, ranks, scaling = LAYOUTS["mixed"]
    x, a, b, base = _make(lens, ranks, dtype=dtype)
    y = multi_lora(x, lens, a, b, scaling, base=base)
    ref = multi_lora_ref(x.double(), segments_for(tuple(lens)), [t.double() for t in a],
                         [t.double() for t in b], scaling, base.double())
    # fp32: GEMM sums of 33 terms; bf16: one rounding of the fp32 result (2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


def test_gradcheck_eager_and_custom_op_paths():
    """Both routes to the same implementation: eager (autograd.Function) and the custom op
    (what tracing sees, with its registered autograd)."""
    lens, ranks, scaling = [2, 0, 3], [2, 1, 3], [0.5, 2.0, -1.0]
    x, a, b, base = _make(lens, ranks, k=5, n=4)
    inputs = [t.requires_grad_() for t in (x, *a, *b, base)]

    def eager(x, a0, a1, a2, b0, b1, b2, base):
        return multi_lora(x, lens, [a0, a1, a2], [b0, b1, b2], scaling, base=base)

    def custom_op(x, a0, a1, a2, b0, b1, b2, base):
        return torch.ops.muxc.multi_lora(x, lens, [a0, a1, a2], [b0, b1, b2], scaling, base,
                                         "grouped")

    assert torch.autograd.gradcheck(eager, inputs)
    assert torch.autograd.gradcheck(custom_op, inputs)


def test_many_short_segments_run_as_one_gemm_pair():
    """16 short low-rank segments: one run (2 GEMMs forward, 5 backward), where the reference
    loop issues 2 GEMMs per task forward."""
    lens, ranks = [4] * 16, [4, 8, 2, 1] * 4
    x, a, b, base = _make(lens, ranks, k=64, n=64, dtype=torch.float32)
    plan = grouped.lora_plan(tuple(lens), tuple(ranks), 64, 64)
    assert len(plan.runs) == 1 and plan.runs[0].tasks == tuple(range(16))
    scaling = [1.0] * 16
    assert _gemms(lambda: multi_lora(x, lens, a, b, scaling, base=base)) == 2
    assert _gemms(lambda: multi_lora(x, lens, a, b, scaling, impl="torch")) == 32
    for t in (x, *a, *b):
        t.requires_grad_()
    y = multi_lora(x, lens, a, b, scaling, base=base)
    assert _gemms(lambda: y.backward(torch.ones_like(y))) == 5


def test_plan_splits_where_the_mask_would_cost_more_than_the_calls():
    long_high = grouped.lora_plan((2048, 2048), (64, 64), 384, 384)
    assert [r.tasks for r in long_high.runs] == [(0,), (1,)]
    short_low = grouped.lora_plan((16, 16), (4, 8), 384, 384)
    assert [r.tasks for r in short_low.runs] == [(0, 1)]
    # rank-0 tasks are in no run: their rows are gaps (zeros / base); empty tasks are idle
    edges = grouped.lora_plan((5, 3, 0, 4), (0, 2, 3, 0), 16, 16)
    assert [(r.start, r.end, r.tasks) for r in edges.runs] == [(5, 8, (1,))]
    assert edges.gaps == ((0, 5), (8, 12)) and edges.idle == (2,)


def test_layout_metadata_is_cached_per_segments_and_keyed_by_ranks_and_scaling():
    segs = segments_for((6, 2, 3))
    x, a, b, _ = _make([6, 2, 3], [2, 1, 2], dtype=torch.float32)
    first = grouped._layout(x, segs, a, b, [1.0, 2.0, 3.0], torch.float32)
    assert grouped._layout(x, segs, a, b, [1.0, 2.0, 3.0], torch.float32) is first
    (run,), (mask,) = first[0].runs, first[1]
    assert mask.scale.shape == mask.off.shape == (11, 5)
    scale = mask.scale
    assert scale[:6, :2].eq(1.0).all() and scale[6:8, 2:3].eq(2.0).all()
    assert scale[8:, 3:].eq(3.0).all()
    assert scale.sum() == 6 * 2 * 1.0 + 2 * 1 * 2.0 + 3 * 2 * 3.0  # zero off the blocks
    assert (~mask.off).sum() == 6 * 2 + 2 * 1 + 3 * 2 and not mask.off[:6, :2].any()
    other_scaling = grouped._layout(x, segs, a, b, [1.0, 2.0, 4.0], torch.float32)
    assert other_scaling is not first and other_scaling[1][0].scale[8:, 3:].eq(4.0).all()
    x2, a2, b2, _ = _make([6, 2, 3], [2, 0, 2], dtype=torch.float32)
    other_ranks = grouped._layout(x2, segs, a2, b2, [1.0, 2.0, 3.0], torch.float32)
    assert other_ranks[0].runs[0].tasks == (0, 2)


@pytest.mark.parametrize("poison", ["rows", "lora_b", "lora_a"])
def test_a_non_finite_task_does_not_reach_the_others_in_its_run(poison):
    """Task 1 overflows (its tokens), or its adapter is inf/NaN: tasks 0 and 2, served by the
    same GEMMs, get exactly the reference's finite results (0 * inf = NaN must not leak)."""
    lens, ranks, scaling = [4, 3, 5], [2, 3, 1], [1.0, 2.0, 0.5]
    x, a, b, base = _make(lens, ranks)
    assert len(grouped.lora_plan(tuple(lens), tuple(ranks), 33, 17).runs) == 1
    with torch.no_grad():
        if poison == "rows":
            x[4:7] = torch.inf
        elif poison == "lora_b":
            b[1][0, 0] = torch.inf
        else:
            a[1][1, 2] = torch.nan
    for t in (x, *a, *b):
        t.requires_grad_()
    y = multi_lora(x, lens, a, b, scaling, base=base)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    y.backward(dy)
    segs = segments_for(tuple(lens))
    xd, ad, bd = x.detach(), [t.detach() for t in a], [t.detach() for t in b]
    y_ref = multi_lora_ref(xd, segs, ad, bd, scaling, base)
    dx_ref, da_ref, db_ref = multi_lora_bwd_ref(dy, xd, segs, ad, bd, scaling)
    for rows in (slice(0, 4), slice(7, 12)):
        assert torch.isfinite(y[rows]).all() and torch.isfinite(x.grad[rows]).all()
        torch.testing.assert_close(y.detach()[rows], y_ref[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[rows], dx_ref[rows], rtol=1e-12, atol=1e-12)
    for i in (0, 2):
        torch.testing.assert_close(a[i].grad, da_ref[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b[i].grad, db_ref[i], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(y[4:7]).all()  # the poisoned task itself does see it


@pytest.mark.parametrize("lens", [[5], [4, 0, 6, 2], [3, 7, 0], [0, 0]], ids=str)
def test_ia3_equals_fp64_reference(lens):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(sum(lens), 9, generator=g, dtype=F64, requires_grad=True)
    vs = [torch.randn(9, generator=g, dtype=F64, requires_grad=True) for _ in lens]
    before = grouped.calls()
    z = multi_ia3(h, lens, vs)
    dz = torch.randn(z.shape, generator=g, dtype=F64)
    z.backward(dz)
    after = grouped.calls()
    assert after["multi_ia3"] - before.get("multi_ia3", 0) == 1
    assert after["multi_ia3_bwd"] - before.get("multi_ia3_bwd", 0) == 1
    segs = segments_for(tuple(lens))
    vd = [v.detach() for v in vs]
    dh_ref, dv_ref = multi_ia3_bwd_ref(dz, h.detach(), segs, vd)
    torch.testing.assert_close(z.detach(), multi_ia3_ref(h.detach(), segs, vd))
    torch.testing.assert_close(h.grad, dh_ref)
    for i, n in enumerate(lens):
        torch.testing.assert_close(vs[i].grad, dv_ref[i])
        if n == 0:
            assert not vs[i].grad.any()


def test_ia3_uses_one_broadcast_over_task_tiles():
    segs = segments_for((64, 32, 0, 96))
    g, index = grouped._tiles(segs, torch.device("cpu"))
    assert g == 32 and index.tolist() == [0, 0, 1, 3, 3, 3]
    assert grouped._tiles(segs, torch.device("cpu"))[1] is index  # cached on the Segments
    h = torch.randn(192, 8)
    vs = [torch.randn(8) for _ in range(4)]
    with profile() as prof:
        multi_ia3(h, [64, 32, 0, 96], vs)
    muls = sum(e.count for e in prof.key_averages() if e.key == "aten::mul")
    assert muls == 1
