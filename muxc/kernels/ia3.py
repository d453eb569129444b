"""Multi-task IA3: scale each task's token segment by that task's vector along features.

``z[seg i] = h[seg i] * vectors[i]`` where ``vectors[i]`` has shape ``(N,)``. Forward and
backward dispatch through the kernel registry; this file holds the public op, its autograd
and the torch reference.

>>> h = torch.ones(3, 2)
>>> multi_ia3(h, [1, 2], [torch.tensor([2., 3.]), torch.tensor([0., 1.])], impl="torch")
tensor([[2., 3.],
        [0., 1.],
        [0., 1.]])
"""

from __future__ import annotations

import torch

from muxc.errors import KernelInputError
from muxc.kernels import registry
from muxc.kernels._triton import (
    AVAILABLE,
    F_PTR,
    TUNER,
    Config,
    check,
    count_launch,
    jit,
    row_tiles,
    seg_meta,
    seg_ptr,
    segment_table,
    tl,
    triton,
)
from muxc.kernels.lora import acc_dtype
from muxc.kernels.op import define_segmented_op
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = [
    "multi_ia3",
    "multi_ia3_ref",
    "multi_ia3_bwd_ref",
    "multi_ia3_triton",
    "multi_ia3_bwd_triton",
    "ia3_scale",
    "ia3_grad",
]


def multi_ia3_ref(h, segs: Segments, vectors) -> torch.Tensor:
    """Torch reference: a Python loop over segments."""
    z = torch.empty_like(h)
    for i, s, e in segs.bounds():
        if e > s:
            z[s:e] = h[s:e] * vectors[i]
    return z


def multi_ia3_bwd_ref(dz, h, segs: Segments, vectors):
    """Torch reference backward: ``(dh, [dv_i])`` with dv_i a sum over segment i's tokens."""
    dh = torch.empty_like(h)
    dv = [torch.zeros_like(v) for v in vectors]
    for i, s, e in segs.bounds():
        if e > s:
            dh[s:e] = dz[s:e] * vectors[i]
            acc = acc_dtype(h.dtype)
            dv[i] = (dz[s:e].to(acc) * h[s:e].to(acc)).sum(0).to(dv[i].dtype)
    return dh, dv


registry.register("multi_ia3", Impl.TORCH, multi_ia3_ref, registry.always)
registry.register("multi_ia3_bwd", Impl.TORCH, multi_ia3_bwd_ref, registry.always)


# ============================================================================ Triton kernels
#
# Forward and the backward's dh are the same elementwise kernel (dh = dz * v_i); dv_i is a
# segmented reduction over segment i's tokens, one launch for all tasks. Products are taken
# in fp32 and rounded once to the input dtype. A segment table row holds the task's token
# range and the pointers of v_i and dv_i (see `_triton.segment_table`).


@jit
def _ia3_scale_kernel(
    h_ptr, tab_ptr, tiles_ptr, z_ptr, N, stride_m,
    V_FIELD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """z[rows, cols] = h[rows, cols] * v_seg[cols] for one row tile of one segment."""
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.load(tiles_ptr + 2 * tile)
    row0 = tl.load(tiles_ptr + 2 * tile + 1)
    start, n, rank, u_off = seg_meta(tab_ptr, seg)
    v_ptr = seg_ptr(tab_ptr, seg, V_FIELD, h_ptr)
    rows = row0 + tl.arange(0, BLOCK_M)
    c_ok = cols < N
    ok = (rows < start + n)[:, None] & c_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
    v = tl.load(v_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(z_ptr + offs, (h * v[None, :]).to(z_ptr.dtype.element_ty), mask=ok)


@jit
def _ia3_grad_kernel(
    dz_ptr, h_ptr, tab_ptr, N, stride_m,
    OUT_FIELD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dv_seg[cols] = sum over segment ``pid0``'s rows of dz * h (zeros for empty segments)."""
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start, n, rank, u_off = seg_meta(tab_ptr, seg)
    c_ok = cols < N
    tt = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(0, n, BLOCK_M):
        rows = (start + t0 + tt).to(tl.int64)
        ok = ((t0 + tt) < n)[:, None] & c_ok[None, :]
        offs = rows[:, None] * stride_m + cols[None, :]
        dz = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(dz * h, axis=0)
    out = seg_ptr(tab_ptr, seg, OUT_FIELD, h_ptr)
    tl.store(out + cols, acc.to(h_ptr.dtype.element_ty), mask=c_ok)


# ============================================================================ launchers
#
# Tuning candidates (GPU): both kernels are pure streaming; wide rows (128-256 fp16 columns =
# 256-512 contiguous bytes) coalesce, BLOCK_M trades per-program work against masked rows of
# short segments; the reduction also wants enough (segment x column-block) programs to fill
# the SMs, hence its narrower options. The interpreter uses one large config, untimed.

_SCALE_CANDIDATES = (
    Config(block_m=16, block_n=256, num_warps=4),
    Config(block_m=32, block_n=128, num_warps=4),
    Config(block_m=32, block_n=256, num_warps=8),
    Config(block_m=64, block_n=128, num_warps=8),
    Config(block_m=64, block_n=256, num_warps=8),
)
_GRAD_CANDIDATES = (
    Config(block_m=32, block_n=64, num_warps=4),
    Config(block_m=64, block_n=64, num_warps=4),
    Config(block_m=64, block_n=128, num_warps=4),
    Config(block_m=128, block_n=128, num_warps=8),
    Config(block_m=32, block_n=256, num_warps=8),
)
_INTERPRETER_CONFIG = Config(block_m=128, block_n=512)


def ia3_scale(h, segs: Segments, tab, out, *, v_field: int) -> None:
    """One launch: ``out[seg i] = h[seg i] * v_i`` for all tasks (``v_i`` = pointer column
    ``v_field``); used for the forward and for the backward's dh."""
    n = h.shape[1]

    def launch(cfg: Config) -> None:
        tiles, n_tiles = row_tiles(segs, cfg.block_m, h.device)
        grid = (n_tiles, triton.cdiv(n, cfg.block_n))
        _ia3_scale_kernel[grid](
            h, tab, tiles, out, n, h.stride(0), V_FIELD=v_field,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )

    key = TUNER.key("ia3_scale", segs, n, n, 0, h)
    fitted = [c.fit(n, 1) for c in _SCALE_CANDIDATES]
    launch(TUNER.pick(key, fitted, _INTERPRETER_CONFIG.fit(n, 1), launch, h.device,
                       work=segs.total * n))
    count_launch("ia3_scale")


def ia3_grad(dz, h, segs: Segments, tab, *, out_field: int) -> None:
    """One launch: ``dv_i = sum_t dz[t] * h[t]`` over each segment i's tokens, written to
    pointer column ``out_field``."""
    n = h.shape[1]

    def launch(cfg: Config) -> None:
        grid = (len(segs), triton.cdiv(n, cfg.block_n))
        _ia3_grad_kernel[grid](
            dz, h, tab, n, h.stride(0), OUT_FIELD=out_field,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )

    key = TUNER.key("ia3_grad", segs, n, n, 0, h)
    fitted = [c.fit(n, 1) for c in _GRAD_CANDIDATES]
    launch(TUNER.pick(key, fitted, _INTERPRETER_CONFIG.fit(n, 1), launch, h.device,
                       work=segs.total * n))
    count_launch("ia3_grad")


def multi_ia3_triton(h, segs: Segments, vectors) -> torch.Tensor:
    """Triton forward: one launch for all tasks."""
    z = torch.empty_like(h)
    if h.shape[0] == 0:
        return z
    vectors = [v.contiguous() for v in vectors]
    tab = segment_table(segs, [0] * len(segs), [vectors], h.device)
    ia3_scale(h.contiguous(), segs, tab, z, v_field=F_PTR)
    return z


def multi_ia3_bwd_triton(dz, h, segs: Segments, vectors):
    """Triton backward: dh (elementwise) and every dv_i (segmented reduction), 2 launches."""
    dv = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vectors]
    if h.shape[0] == 0:
        return torch.empty_like(h), [d.zero_() for d in dv]
    vectors = [v.contiguous() for v in vectors]
    dz, h = dz.contiguous(), h.contiguous()
    tab = segment_table(segs, [0] * len(segs), [vectors, dv], h.device)
    dh = torch.empty_like(h)
    ia3_scale(dz, segs, tab, dh, v_field=F_PTR)
    ia3_grad(dz, h, segs, tab, out_field=F_PTR + 1)
    return dh, dv


if AVAILABLE:
    registry.register("multi_ia3", Impl.TRITON, multi_ia3_triton, check)
    registry.register("multi_ia3_bwd", Impl.TRITON, multi_ia3_bwd_triton, check)


_OP = define_segmented_op(
    "multi_ia3",
    schema="(Tensor h, int[] seg_lens, Tensor[] vectors, str? impl) -> Tensor",
    bwd_schema="(Tensor grad, Tensor h, int[] seg_lens, Tensor[] vectors, str? impl)"
               " -> (Tensor, Tensor[])",
    fake=lambda h, seg_lens, vectors, impl: torch.empty_like(h),
    grads=("h", "vectors"),
)


def multi_ia3(h, seg_lens, vectors, impl: Impl | str | None = None):
    """``z[seg i] = h[seg i] * vectors[i]`` for all tasks in one op.

    h: ``(T, N)``; seg_lens: per-task counts summing to T (zeros allowed); vectors[i]: ``(N,)``.
    Differentiable in h and every vector.
    """
    segs = Segments.of(seg_lens)
    segs.check_rows("h", h)
    if len(vectors) != len(segs) or not vectors:
        raise KernelInputError(
            f"need one vector per segment: {len(segs)} segments, {len(vectors)} vectors"
        )
    for i, v in enumerate(vectors):
        if v.shape != (h.shape[1],) or v.dtype != h.dtype or v.device != h.device:
            raise KernelInputError(
                f"segment {i}: vector must be ({h.shape[1]},) {h.dtype} on {h.device}; "
                f"got {tuple(v.shape)} {v.dtype} on {v.device}"
            )
    impl = Impl.parse(impl)
    return _OP(h.contiguous(), list(segs.lens), list(vectors), None if impl is None else impl.value)
