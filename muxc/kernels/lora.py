"""Multi-task LoRA: one op applies every task's LoRA adapter to its own token segment.

``y[seg i] = scaling[i] * x[seg i] @ lora_a[i].T @ lora_b[i].T`` with per-task ranks (rank 0
allowed: that segment gets zeros). Forward and backward each dispatch through the kernel
registry; this file holds the family's Triton kernels (shrink, expand, segmented gradient
reduction) and their launchers, the public op with its autograd, and the torch reference.

>>> x = torch.ones(3, 2)
>>> a, b = [torch.ones(1, 2), torch.ones(4, 2)], [torch.ones(2, 1), torch.ones(2, 4)]
>>> multi_lora(x, [1, 2], a, b, [1.0, 0.5], impl="torch")
tensor([[2., 2.],
        [4., 4.],
        [4., 4.]])
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
    float_table,
    interpreting,
    jit,
    ragged_size,
    row_tiles,
    seg_meta,
    seg_ptr,
    segment_table,
    tl,
    triton,
)
from muxc.kernels.op import define_segmented_op, segments_for
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = [
    "multi_lora",
    "multi_lora_ref",
    "multi_lora_bwd_ref",
    "multi_lora_triton",
    "multi_lora_bwd_triton",
    "lora_shrink",
    "lora_expand",
    "lora_grad",
    "segments_for",
    "acc_dtype",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def multi_lora_ref(x, segs: Segments, lora_a, lora_b, scaling, base=None) -> torch.Tensor:
    """Torch reference: a Python loop over segments, accumulating in at least fp32.

    Returns the LoRA delta, or ``base + delta`` when ``base`` (``(T, N)``, x's dtype) is given.
    """
    acc = acc_dtype(x.dtype)
    y = x.new_zeros(x.shape[0], lora_b[0].shape[0] if lora_b else 0)
    for i, s, e in segs.bounds():
        if e > s and lora_a[i].shape[0] > 0:
            u = x[s:e].to(acc) @ lora_a[i].to(acc).t()
            y[s:e] = ((u @ lora_b[i].to(acc).t()) * scaling[i]).to(y.dtype)
    return y if base is None else base + y


def multi_lora_bwd_ref(dy, x, segs: Segments, lora_a, lora_b, scaling):
    """Torch reference backward: returns ``(dx, [dA_i], [dB_i])``."""
    dx = torch.zeros_like(x)
    da = [torch.zeros_like(a) for a in lora_a]
    db = [torch.zeros_like(b) for b in lora_b]
    for i, s, e in segs.bounds():
        if e == s or lora_a[i].shape[0] == 0:
            continue
        acc = acc_dtype(x.dtype)
        a, b, xs, g = (t.to(acc) for t in (lora_a[i], lora_b[i], x[s:e], dy[s:e]))
        gb = (g @ b) * scaling[i]  # (n, r): gradient w.r.t. the rank-r intermediate
        dx[s:e] = (gb @ a).to(dx.dtype)
        da[i] = (gb.t() @ xs).to(da[i].dtype)
        db[i] = ((g.t() @ (xs @ a.t())) * scaling[i]).to(db[i].dtype)
    return dx, da, db


registry.register("multi_lora", Impl.TORCH, multi_lora_ref, registry.always)
registry.register("multi_lora_bwd", Impl.TORCH, multi_lora_bwd_ref, registry.always)


# ============================================================================ Triton kernels
#
# Three kernels serve forward and backward; each is ONE launch for all tasks. Every task
# keeps its own A_i (r_i, K) and B_i (N, r_i); a segment table row holds the task's token
# range, its rank and the data pointers of its tensors (see `_triton.segment_table`). The
# rank-r_i intermediate is stored *ragged*: row t of segment i holds exactly r_i fp32 values
# at ``u_off_i + (t - start_i) * r_i``, so no rank is ever padded to the maximum, in memory or
# in loads. A program whose rank chunk starts past its segment's rank exits at once; inside
# the last chunk, loads and stores are masked to r_i (the dot itself is >= 16 wide, the
# minimum tensor-core tile, which costs no memory traffic).
#
#   forward   u  = shrink(x, A)            y  = expand(u, B) * s_i   (+ base, fused)
#   backward  du = shrink(dy, B) * s_i     dx = expand(du, A)
#             dA_i = du_i^T x_i            dB_i = s_i * dy_i^T u_i   (segmented reductions)
#
# Weight addressing. Shrink reads W^T[c, r] and expand reads W[r, c] of either adapter:
# A_i[r, c] sits at r*K + c; B_i[c, r] at c*r_i + r (both contiguous). ``W_IS_B`` selects.
# Precision: fp32 inputs use IEEE fp32 dots (no TF32: results must match PEFT tightly);
# fp16/bf16 feed the tensor cores in the input dtype with fp32 accumulation, the fp32
# intermediate is cast to the input dtype before the second GEMM (as PEFT's own
# lora_B(lora_A(x)) does).


@jit
def _lora_shrink_kernel(
    x_ptr, tab_ptr, scale_ptr, tiles_ptr, u_ptr, K, stride_xm,
    W_FIELD: tl.constexpr, W_IS_B: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[rows of tile, r0:r0+BLOCK_R] = x[rows] @ W_seg^T (* s_seg), into the ragged buffer."""
    tile = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    seg = tl.load(tiles_ptr + 2 * tile)
    row0 = tl.load(tiles_ptr + 2 * tile + 1)
    start, n, rank, u_off = seg_meta(tab_ptr, seg)
    if r0 >= rank:
        return
    w_ptr = seg_ptr(tab_ptr, seg, W_FIELD, x_ptr)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < start + n
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    if W_IS_B:
        s_c, s_r = rank, 1
    else:
        s_c, s_r = 1, K
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        xt = tl.load(x_rows + (k0 + kk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(
            w_ptr + (k0 + kk)[:, None] * s_c + rr[None, :] * s_r,
            mask=k_ok[:, None] & r_ok[None, :], other=0.0,
        )
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    u_off_rows = u_off + (rows - start).to(tl.int64) * rank
    tl.store(u_ptr + u_off_rows[:, None] + rr[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@jit
def _lora_expand_kernel(
    u_ptr, tab_ptr, scale_ptr, tiles_ptr, out_ptr, C, stride_om,
    W_FIELD: tl.constexpr, W_IS_B: tl.constexpr, SCALED: tl.constexpr,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[rows, cols] (+)= u[rows, :r_seg] @ W_seg[:r_seg, cols] (* s_seg); rank 0 -> zeros."""
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.load(tiles_ptr + 2 * tile)
    row0 = tl.load(tiles_ptr + 2 * tile + 1)
    start, n, rank, u_off = seg_meta(tab_ptr, seg)
    w_ptr = seg_ptr(tab_ptr, seg, W_FIELD, out_ptr)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < start + n
    c_ok = cols < C
    if W_IS_B:
        s_r, s_c = 1, rank
    else:
        s_r, s_c = C, 1
    u_rows = u_ptr + u_off + (rows - start).to(tl.int64) * rank
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        ut = tl.load(u_rows[:, None] + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        wt = tl.load(
            w_ptr + rr[:, None] * s_r + cols[None, :] * s_c,
            mask=r_ok[:, None] & c_ok[None, :], other=0.0,
        )
        if IEEE:
            acc = tl.dot(ut, wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(ut.to(wt.dtype), wt, acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    o_ok = row_ok[:, None] & c_ok[None, :]
    if ACCUMULATE:
        acc = acc + tl.load(o_ptrs, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


@jit
def _lora_grad_kernel(
    g_ptr, u_ptr, tab_ptr, scale_ptr, C, stride_gm,
    OUT_FIELD: tl.constexpr, OUT_IS_B: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Segmented reduction over segment ``pid0``'s tokens: acc[r, c] = sum_t u[t, r] g[t, c].

    Stored as dA_i[r, c] (``OUT_IS_B`` false) or s_i * dB_i[c, r]; empty segments store zeros.
    """
    seg = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    start, n, rank, u_off = seg_meta(tab_ptr, seg)
    if r0 >= rank:
        return
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    c_ok = cols < C
    tt = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, n, BLOCK_M):
        t_ok = (t0 + tt) < n
        local = (t0 + tt).to(tl.int64)
        ut = tl.load(
            u_ptr + u_off + local[:, None] * rank + rr[None, :],
            mask=t_ok[:, None] & r_ok[None, :], other=0.0,
        )
        gt = tl.load(
            g_ptr + (start + local)[:, None] * stride_gm + cols[None, :],
            mask=t_ok[:, None] & c_ok[None, :], other=0.0,
        )
        if IEEE:
            acc = tl.dot(tl.trans(ut), gt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(ut.to(gt.dtype)), gt, acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    out = seg_ptr(tab_ptr, seg, OUT_FIELD, g_ptr)
    ok = r_ok[:, None] & c_ok[None, :]
    if OUT_IS_B:
        tl.store(out + cols[None, :] * rank + rr[:, None], acc.to(g_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out + rr[:, None] * C + cols[None, :], acc.to(g_ptr.dtype.element_ty), mask=ok)


# ============================================================================ launchers
#
# Tuning candidates (GPU). All three kernels are memory-bound at LoRA ranks (<= 64): shrink
# streams x (T, K) once per rank chunk, expand streams the (T, N) output, the reductions
# stream x / dy once per rank chunk. So the candidates favour wide feature blocks (64-256
# fp16 columns = 128-512 contiguous bytes per row) for coalesced loads, BLOCK_R 16 (the
# smallest tensor-core tile, so a rank-4 task does no more work than a rank-16 one) up to 64
# (one pass over x when every task has rank <= 64), and BLOCK_M 32-128 so short segments
# waste few masked rows. 3 pipeline stages hide load latency; the largest tiles fit the
# 227 KB of shared memory an H100 block may use (checked by tests/kernels/aot_compile.py).
# The first candidate of each list is the untimed choice for small problems (see `Tuner`).
# The interpreter uses one fixed, untimed config: wide feature blocks (fewer program
# instances: each costs milliseconds in numpy) and BLOCK_R 16 (its dot is not BLAS-backed,
# so rank columns past a task's r_i would cost real time).

_SHRINK_CANDIDATES = (
    Config(block_m=32, block_n=128, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=128, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=32, block_n=256, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=64, block_r=32, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=128, block_r=32, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=64, block_r=64, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=64, block_r=64, num_warps=8, num_stages=3),
    Config(block_m=128, block_n=128, block_r=16, num_warps=8, num_stages=3),
)
_EXPAND_CANDIDATES = (
    Config(block_m=64, block_n=64, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=128, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=64, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=32, block_n=256, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=128, block_r=16, num_warps=8, num_stages=3),
    Config(block_m=64, block_n=128, block_r=32, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=128, block_r=64, num_warps=8, num_stages=2),
    Config(block_m=64, block_n=256, block_r=64, num_warps=8, num_stages=2),
)
_GRAD_CANDIDATES = (
    Config(block_m=64, block_n=64, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=128, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=64, block_r=16, num_warps=4, num_stages=3),
    Config(block_m=32, block_n=128, block_r=32, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=64, block_r=64, num_warps=4, num_stages=3),
    Config(block_m=128, block_n=128, block_r=16, num_warps=8, num_stages=3),
    Config(block_m=64, block_n=128, block_r=64, num_warps=8, num_stages=2),
)
_INTERPRETER_CONFIG = Config(block_m=64, block_n=256, block_r=16)


def _tuned(op, segs, in_w, out_w, width, max_r, t, candidates, launch) -> Config:
    """The config for one launch reading ``in_w`` and writing ``out_w`` columns per token,
    whose feature blocks tile ``width`` columns."""
    key = TUNER.key(op, segs, in_w, out_w, max_r, t)
    fitted = [c.fit(width, max_r) for c in candidates]
    default = _INTERPRETER_CONFIG.fit(width, max_r)
    return TUNER.pick(key, fitted, default, launch, t.device, work=segs.total * width)


def lora_shrink(x, segs: Segments, tab, scale, u, max_rank: int, *, w_field: int,
                w_is_b: bool, scaled: bool) -> None:
    """One launch: ``u`` (ragged fp32) = x_i @ W_i^T (* s_i) for every segment i.

    ``W_i`` is pointer column ``w_field`` of ``tab``: A_i ``(r_i, K)`` or, with ``w_is_b``,
    B_i ``(K, r_i)`` read transposed (the backward's dy @ B_i).
    """
    k = x.shape[1]

    def launch(cfg: Config) -> None:
        tiles, n_tiles = row_tiles(segs, cfg.block_m, x.device)
        grid = (n_tiles, triton.cdiv(max_rank, cfg.block_r))
        _lora_shrink_kernel[grid](
            x, tab, scale, tiles, u, k, x.stride(0),
            W_FIELD=w_field, W_IS_B=w_is_b, SCALED=scaled, IEEE=x.dtype == torch.float32,
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    op = "lora_shrink" if not w_is_b else "lora_bwd_shrink"
    launch(_tuned(op, segs, k, max_rank, k, max_rank, x, _SHRINK_CANDIDATES, launch))
    count_launch("lora_shrink")


def lora_expand(u, segs: Segments, tab, scale, out, max_rank: int, *, w_field: int,
                w_is_b: bool, scaled: bool, accumulate: bool) -> None:
    """One launch: ``out`` (T, C) (+)= u_i @ W_i (* s_i) for every segment (rank 0 -> 0).

    ``W_i`` is B_i ``(C, r_i)`` read transposed (``w_is_b``) or A_i ``(r_i, C)``. With
    ``accumulate`` the result is added to ``out`` (fusing with the base op's output).
    """
    c = out.shape[1]

    def launch(cfg: Config, target=None) -> None:
        tiles, n_tiles = row_tiles(segs, cfg.block_m, out.device)
        grid = (n_tiles, triton.cdiv(c, cfg.block_n))
        _lora_expand_kernel[grid](
            u, tab, scale, tiles, out if target is None else target, c, out.stride(0),
            W_FIELD=w_field, W_IS_B=w_is_b, SCALED=scaled, ACCUMULATE=accumulate,
            IEEE=out.dtype == torch.float32,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def trial(cfg: Config) -> None:  # never touches `out`: accumulating twice would be wrong
        launch(cfg, scratch)

    scratch = None
    if out.device.type == "cuda" and not interpreting():
        scratch = torch.empty_like(out) if accumulate else out
    op = "lora_expand" if w_is_b else "lora_bwd_expand"
    launch(_tuned(op, segs, max_rank, c, c, max_rank, out, _EXPAND_CANDIDATES, trial))
    count_launch("lora_expand")


def lora_grad(g, u, segs: Segments, tab, scale, max_rank: int, *, out_field: int,
              out_is_b: bool, scaled: bool) -> None:
    """One launch: per segment i, ``u_i^T g_i`` (r_i, C) into pointer column ``out_field``:
    dA_i (``out_is_b`` false) or, transposed and scaled by s_i, dB_i ``(C, r_i)``."""
    c = g.shape[1]

    def launch(cfg: Config) -> None:
        grid = (len(segs), triton.cdiv(max_rank, cfg.block_r), triton.cdiv(c, cfg.block_n))
        _lora_grad_kernel[grid](
            g, u, tab, scale, c, g.stride(0),
            OUT_FIELD=out_field, OUT_IS_B=out_is_b, SCALED=scaled,
            IEEE=g.dtype == torch.float32,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    op = "lora_grad_b" if out_is_b else "lora_grad_a"
    launch(_tuned(op, segs, c, max_rank, c, max_rank, g, _GRAD_CANDIDATES, launch))
    count_launch("lora_grad")


def _interpreter_upcast(fn):
    """bf16 ``tl.dot`` is broken in the Triton interpreter: there, run bf16 in fp32 and round
    the results back (compiled GPU kernels take bf16 natively)."""

    def wrapper(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not (tensors and tensors[0].dtype == torch.bfloat16 and interpreting()):
            return fn(*args)
        return _cast(fn(*[_cast(a, torch.float32) for a in args]), torch.bfloat16)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


@_interpreter_upcast
def multi_lora_triton(x, segs: Segments, lora_a, lora_b, scaling, base=None) -> torch.Tensor:
    """Triton forward: shrink + expand, two launches for all tasks.

    With ``base`` (``(T, N)``, x's dtype, e.g. the base op's result) the expand launch adds the
    LoRA delta into a copy of it (the fused ``out=`` accumulate path) and returns
    ``base + delta``; otherwise it returns the ``(T, N)`` delta.
    """
    t, _ = x.shape
    n = lora_b[0].shape[0]
    ranks = [a.shape[0] for a in lora_a]
    max_rank = max(ranks)
    if base is None:
        y = x.new_empty(t, n) if max_rank > 0 else x.new_zeros(t, n)
    else:
        y = base.contiguous().clone()
    if t == 0 or max_rank == 0:
        return y
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    tab = segment_table(segs, ranks, [lora_a, lora_b], x.device)
    scale = float_table(scaling, x.device)
    u = torch.empty(max(1, ragged_size(segs, ranks)), dtype=torch.float32, device=x.device)
    lora_shrink(x, segs, tab, scale, u, max_rank, w_field=F_PTR, w_is_b=False, scaled=False)
    lora_expand(u, segs, tab, scale, y, max_rank, w_field=F_PTR + 1, w_is_b=True, scaled=True,
                accumulate=base is not None)
    return y


@_interpreter_upcast
def multi_lora_bwd_triton(dy, x, segs: Segments, lora_a, lora_b, scaling):
    """Triton backward: 5 launches for all tasks (u and du shrinks, dx expand, dA and dB
    segmented reductions); ``u`` is recomputed rather than saved by the forward."""
    t, k = x.shape
    ranks = [a.shape[0] for a in lora_a]
    max_rank = max(ranks)
    da = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in lora_a]
    db = [torch.empty(b.shape, dtype=b.dtype, device=b.device) for b in lora_b]
    if max_rank == 0:
        return torch.zeros_like(x), da, db
    if t == 0:
        return torch.zeros_like(x), [d.zero_() for d in da], [d.zero_() for d in db]
    dy = dy.contiguous()
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    tab = segment_table(segs, ranks, [lora_a, lora_b, da, db], x.device)
    scale = float_table(scaling, x.device)
    size = max(1, ragged_size(segs, ranks))
    u = torch.empty(size, dtype=torch.float32, device=x.device)
    du = torch.empty(size, dtype=torch.float32, device=x.device)
    lora_shrink(x, segs, tab, scale, u, max_rank, w_field=F_PTR, w_is_b=False, scaled=False)
    lora_shrink(dy, segs, tab, scale, du, max_rank, w_field=F_PTR + 1, w_is_b=True, scaled=True)
    dx = torch.empty_like(x)
    lora_expand(du, segs, tab, scale, dx, max_rank, w_field=F_PTR, w_is_b=False, scaled=False,
                accumulate=False)
    lora_grad(x, du, segs, tab, scale, max_rank, out_field=F_PTR + 2, out_is_b=False,
              scaled=False)
    lora_grad(dy, u, segs, tab, scale, max_rank, out_field=F_PTR + 3, out_is_b=True, scaled=True)
    return dx, da, db


if AVAILABLE:
    registry.register("multi_lora", Impl.TRITON, multi_lora_triton, check)
    registry.register("multi_lora_bwd", Impl.TRITON, multi_lora_bwd_triton, check)


_OP = define_segmented_op(
    "multi_lora",
    schema="(Tensor x, int[] seg_lens, Tensor[] lora_a, Tensor[] lora_b, float[] scaling, "
           "Tensor? base, str? impl) -> Tensor",
    bwd_schema="(Tensor grad, Tensor x, int[] seg_lens, Tensor[] lora_a, Tensor[] lora_b, "
               "float[] scaling, str? impl) -> (Tensor, Tensor[], Tensor[])",
    fake=lambda x, seg_lens, lora_a, lora_b, scaling, base, impl: x.new_empty(
        x.shape[0], lora_b[0].shape[0]),
    grads=("x", "lora_a", "lora_b"),
    passthrough=("base",),
)


def _validate(x, segs: Segments, lora_a, lora_b, scaling, base) -> None:
    segs.check_rows("x", x)
    n = len(segs)
    if not (len(lora_a) == len(lora_b) == len(scaling) == n) or n == 0:
        raise KernelInputError(
            f"need one lora_a, lora_b and scaling per segment: {n} segments, "
            f"{len(lora_a)} lora_a, {len(lora_b)} lora_b, {len(scaling)} scaling (n >= 1)"
        )
    k = x.shape[1]
    n_out = lora_b[0].shape[0]
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape != (n_out, a.shape[0]):
            raise KernelInputError(
                f"segment {i}: lora_a must be (r, {k}) and lora_b ({n_out}, r); got "
                f"lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}"
            )
        if a.dtype != x.dtype or b.dtype != x.dtype or a.device != x.device or b.device != x.device:
            raise KernelInputError(
                f"segment {i}: adapters must match x ({x.dtype}, {x.device}); got lora_a "
                f"({a.dtype}, {a.device}), lora_b ({b.dtype}, {b.device}); cast the adapter"
            )
    if base is not None and (base.shape != (x.shape[0], n_out) or base.dtype != x.dtype
                             or base.device != x.device):
        raise KernelInputError(
            f"base must be a ({x.shape[0]}, {n_out}) {x.dtype} tensor on {x.device} (the base "
            f"op's output, flattened); got {tuple(base.shape)} {base.dtype} on {base.device}"
        )


def multi_lora(x, seg_lens, lora_a, lora_b, scaling, impl: Impl | str | None = None, *,
               base: torch.Tensor | None = None):
    """``y[seg i] = scaling[i] * x_i @ lora_a[i].T @ lora_b[i].T`` for all tasks in one op.

    x: ``(T, K)``, tokens of all tasks contiguous per task; seg_lens: per-task counts summing
    to T (zeros allowed); lora_a[i]: ``(r_i, K)``; lora_b[i]: ``(N, r_i)``; scaling[i]: float.
    Returns ``(T, N)`` in ``x.dtype``: the delta, or ``base + delta`` computed in one pass when
    ``base`` (``(T, N)``, e.g. the base op's output) is given. Differentiable in x, every
    adapter and ``base``.
    """
    segs = Segments.of(seg_lens)
    _validate(x, segs, lora_a, lora_b, scaling, base)
    impl = Impl.parse(impl)
    return _OP(
        x.contiguous(),
        list(segs.lens),
        list(lora_a),
        list(lora_b),
        [float(s) for s in scaling],
        None if base is None else base.contiguous(),
        None if impl is None else impl.value,
    )
