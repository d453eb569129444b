"""Multi-task LoRA: one op applies every task's LoRA adapter to its own token segment.

``y[seg i] = scaling[i] * x[seg i] @ lora_a[i].T @ lora_b[i].T`` with per-task ranks (rank 0
allowed: that segment gets zeros). Forward and backward each dispatch through the kernel
registry; this file holds the public op, its autograd, and the torch reference.

>>> x = torch.ones(3, 2)
>>> a, b = [torch.ones(1, 2), torch.ones(4, 2)], [torch.ones(2, 1), torch.ones(2, 4)]
>>> multi_lora(x, [1, 2], a, b, [1.0, 0.5], impl="torch")
tensor([[2., 2.],
        [8., 8.],
        [8., 8.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from muxc.errors import KernelInputError
from muxc.kernels import registry
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = ["multi_lora", "multi_lora_ref", "multi_lora_bwd_ref", "segments_for", "acc_dtype"]


@lru_cache(maxsize=256)
def segments_for(lens: tuple[int, ...]) -> Segments:
    """The shared `Segments` for ``lens`` (device metadata built once, reused by every layer)."""
    return Segments.of(lens)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def multi_lora_ref(x, segs: Segments, lora_a, lora_b, scaling) -> torch.Tensor:
    """Torch reference: a Python loop over segments, accumulating in at least fp32."""
    acc = acc_dtype(x.dtype)
    y = x.new_zeros(x.shape[0], lora_b[0].shape[0] if lora_b else 0)
    for i, s, e in segs.bounds():
        if e > s and lora_a[i].shape[0] > 0:
            u = x[s:e].to(acc) @ lora_a[i].to(acc).t()
            y[s:e] = ((u @ lora_b[i].to(acc).t()) * scaling[i]).to(y.dtype)
    return y


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


def _torch_check(*tensors, forced: bool) -> str | None:
    return None


registry.register("multi_lora", Impl.TORCH, multi_lora_ref, _torch_check)
registry.register("multi_lora_bwd", Impl.TORCH, multi_lora_bwd_ref, _torch_check)


@torch.library.custom_op("muxc::multi_lora", mutates_args=())
def _multi_lora_op(
    x: torch.Tensor,
    seg_lens: Sequence[int],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: Sequence[float],
    impl: str | None,
) -> torch.Tensor:
    choice = registry.select("multi_lora", impl, x)
    return choice.fn(x, segments_for(tuple(seg_lens)), list(lora_a), list(lora_b), list(scaling))


@_multi_lora_op.register_fake
def _(x, seg_lens, lora_a, lora_b, scaling, impl):
    return x.new_empty(x.shape[0], lora_b[0].shape[0])


@torch.library.custom_op("muxc::multi_lora_bwd", mutates_args=())
def _multi_lora_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    seg_lens: Sequence[int],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: Sequence[float],
    impl: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    choice = registry.select("multi_lora_bwd", impl, x)
    segs = segments_for(tuple(seg_lens))
    dx, da, db = choice.fn(dy, x, segs, list(lora_a), list(lora_b), list(scaling))
    return dx, list(da), list(db)


@_multi_lora_bwd_op.register_fake
def _(dy, x, seg_lens, lora_a, lora_b, scaling, impl):
    return (
        torch.empty_like(x),
        [torch.empty_like(a) for a in lora_a],
        [torch.empty_like(b) for b in lora_b],
    )


def _setup_context(ctx, inputs, output):
    x, seg_lens, lora_a, lora_b, scaling, impl = inputs
    ctx.save_for_backward(x, *lora_a, *lora_b)
    ctx.meta = (tuple(seg_lens), tuple(scaling), impl, len(lora_a))


def _backward(ctx, dy):
    seg_lens, scaling, impl, n = ctx.meta
    x, *ab = ctx.saved_tensors
    dx, da, db = torch.ops.muxc.multi_lora_bwd(
        dy.contiguous(), x, list(seg_lens), ab[:n], ab[n:], list(scaling), impl
    )
    return dx, None, list(da), list(db), None, None


_multi_lora_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, segs: Segments, lora_a, lora_b, scaling) -> None:
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


def multi_lora(x, seg_lens, lora_a, lora_b, scaling, impl: Impl | str | None = None):
    """``y[seg i] = scaling[i] * x_i @ lora_a[i].T @ lora_b[i].T`` for all tasks in one op.

    x: ``(T, K)``, tokens of all tasks contiguous per task; seg_lens: per-task counts summing
    to T (zeros allowed); lora_a[i]: ``(r_i, K)``; lora_b[i]: ``(N, r_i)``; scaling[i]: float.
    Returns ``(T, N)`` in ``x.dtype``. Differentiable in x and every adapter.
    """
    segs = Segments.of(seg_lens)
    _validate(x, segs, lora_a, lora_b, scaling)
    impl = Impl.parse(impl)
    return torch.ops.muxc.multi_lora(
        x.contiguous(),
        list(segs.lens),
        list(lora_a),
        list(lora_b),
        [float(s) for s in scaling],
        None if impl is None else impl.value,
    )
