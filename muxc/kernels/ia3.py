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

from collections.abc import Sequence

import torch

from muxc.errors import KernelInputError
from muxc.kernels import registry
from muxc.kernels.lora import acc_dtype, segments_for
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = ["multi_ia3", "multi_ia3_ref", "multi_ia3_bwd_ref"]


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


def _torch_check(*tensors, forced: bool) -> str | None:
    return None


registry.register("multi_ia3", Impl.TORCH, multi_ia3_ref, _torch_check)
registry.register("multi_ia3_bwd", Impl.TORCH, multi_ia3_bwd_ref, _torch_check)


@torch.library.custom_op("muxc::multi_ia3", mutates_args=())
def _multi_ia3_op(
    h: torch.Tensor, seg_lens: Sequence[int], vectors: Sequence[torch.Tensor], impl: str | None
) -> torch.Tensor:
    choice = registry.select("multi_ia3", impl, h)
    return choice.fn(h, segments_for(tuple(seg_lens)), list(vectors))


@_multi_ia3_op.register_fake
def _(h, seg_lens, vectors, impl):
    return torch.empty_like(h)


@torch.library.custom_op("muxc::multi_ia3_bwd", mutates_args=())
def _multi_ia3_bwd_op(
    dz: torch.Tensor,
    h: torch.Tensor,
    seg_lens: Sequence[int],
    vectors: Sequence[torch.Tensor],
    impl: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    choice = registry.select("multi_ia3_bwd", impl, h)
    dh, dv = choice.fn(dz, h, segments_for(tuple(seg_lens)), list(vectors))
    return dh, list(dv)


@_multi_ia3_bwd_op.register_fake
def _(dz, h, seg_lens, vectors, impl):
    return torch.empty_like(h), [torch.empty_like(v) for v in vectors]


def _setup_context(ctx, inputs, output):
    h, seg_lens, vectors, impl = inputs
    ctx.save_for_backward(h, *vectors)
    ctx.meta = (tuple(seg_lens), impl)


def _backward(ctx, dz):
    seg_lens, impl = ctx.meta
    h, *vectors = ctx.saved_tensors
    dh, dv = torch.ops.muxc.multi_ia3_bwd(dz.contiguous(), h, list(seg_lens), vectors, impl)
    return dh, None, list(dv), None


_multi_ia3_op.register_autograd(_backward, setup_context=_setup_context)


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
    return torch.ops.muxc.multi_ia3(
        h.contiguous(), list(segs.lens), list(vectors), None if impl is None else impl.value
    )
