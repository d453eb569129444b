"""A frozen LM head and its next-token cross-entropy in one op, in token blocks.

``lm_head_loss(hidden, weight, bias, labels, scale)`` is ``cross_entropy(linear(hidden, weight,
bias).float(), labels, ignore_index=-100, reduction="sum") * scale`` (``scale=None``: divided by
the number of labelled tokens, HF's mean), computed ``block`` tokens at a time. While it runs
forward it also computes the gradient with respect to ``hidden`` (``(softmax - onehot) @
weight``, times the scale) and keeps only that for backward, which multiplies it by the
incoming gradient. So no ``tokens x vocab`` tensor outlives a block: the unfused pair keeps
the logits and their log-softmax (two ``tokens x vocab`` fp32 tensors) from forward to
backward. The weight and bias get no gradient: the op is for a frozen head (a trained head
is a task's own `HeadLoss`).

Plain torch (CPU and CUDA alike); ``lm_head_loss_ref`` is the unfused reference the tests
compare with.

>>> h = torch.randn(2, 3, 4, requires_grad=True)
>>> w, labels = torch.randn(10, 4), torch.tensor([[1, 2, -100], [4, 5, 6]])
>>> fused = lm_head_loss(h, w, None, labels, None, block=2)
>>> bool(torch.allclose(fused, lm_head_loss_ref(h, w, None, labels, None)))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muxc.errors import KernelInputError

__all__ = ["lm_head_loss", "lm_head_loss_ref", "block_tokens", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_BLOCK_BYTES = 4 << 20
"""fp32 logits per block: 4 MiB (32 tokens at a 32k vocabulary), the block's one temporary of
that size (8 MiB blocks with a separate logsumexp buffer were a 16 MiB transient at the step's
memory peak on llama-large); the GEMMs (32 x hidden x vocab) stay large enough that their count
costs nothing measurable on CPU."""


def block_tokens(vocab: int) -> int:
    """Tokens per block for a ``vocab``-sized head (at least 1)."""
    return max(1, _BLOCK_BYTES // (4 * max(vocab, 1)))


def lm_head_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The unfused reference: the whole ``tokens x vocab`` logits, then cross-entropy."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    flat = logits.reshape(-1, logits.shape[-1])
    if scale is None:
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="mean")
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total * scale


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 labels: torch.Tensor, scale: float | None, block: int | None = None) -> torch.Tensor:
    """The blocked op (see the module doc); ``labels`` has ``hidden``'s leading shape."""
    if hidden.shape[:-1] != labels.shape:
        raise KernelInputError(f"lm_head_loss: hidden {tuple(hidden.shape)} and labels "
                               f"{tuple(labels.shape)} disagree on the token dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise KernelInputError(f"lm_head_loss: weight {tuple(weight.shape)} does not map hidden "
                               f"size {hidden.shape[-1]} to a vocabulary")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise KernelInputError("lm_head_loss: the head must be frozen (weight and bias without "
                               "requires_grad); a trained head is the task's own HeadLoss")
    return _LMHeadLoss.apply(hidden, weight, bias, labels, scale,
                             block or block_tokens(weight.shape[0]))


def _forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
             block: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Summed token losses (fp32), the gradient of that sum w.r.t. ``h`` (flat) and the
    number of labelled tokens.

    Only labelled tokens reach the head: unlabelled ones (padding, each sample's last token,
    masked prompts: over a quarter of a chunk-aligned step's tokens) contribute neither loss
    nor gradient, so their rows are gathered out first instead of being projected to the
    vocabulary and then zeroed. Per block of labelled rows the gradient is
    ``(softmax - onehot) @ weight = ((e - norm * onehot) @ weight) / norm`` with
    ``e = exp(z - top)``: the normalisation moves from the ``tokens x vocab`` buffer to the
    ``tokens x hidden`` result."""
    keep = y != IGNORE_INDEX
    rows = keep.nonzero().squeeze(1)
    count = rows.numel()
    full = count == y.numel()
    hk = h if full else h.index_select(0, rows)
    yk = y if full else y.index_select(0, rows)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    gk = torch.empty_like(hk) if want_grad else None
    for s in range(0, count, block):
        target = yk[s : s + block].unsqueeze(1)
        logits = F.linear(hk[s : s + block].to(weight.dtype), weight, bias)
        z = logits.float()  # the block's only tokens x vocab buffer: worked on in place
        del logits
        picked = z.gather(1, target)
        top = z.amax(dim=-1, keepdim=True)
        z.sub_(top).exp_()
        norm = z.sum(dim=-1, keepdim=True)
        total += (top + norm.log() - picked).sum()  # logsumexp - picked, per token
        if gk is not None:
            # (softmax - onehot) @ weight = ((e - norm * onehot) @ weight) / norm: the one-hot
            # is taken off in fp32 before any cast (e_label ~ norm when the label is likely: in
            # a bf16 GEMM output the difference would be lost), the division waits for the GEMM
            z.scatter_add_(1, target, norm.neg())
            g = (z.to(weight.dtype) @ weight).float().div_(norm)
            gk[s : s + block] = g.to(h.dtype)
        del z  # before the next block's logits: one tokens x vocab buffer alive, not two
    if gk is None:
        return total, None, count
    if full:
        return total, gk, count
    grad = torch.zeros_like(h).index_copy_(0, rows, gk)
    return total, grad, count


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, block):
        h = hidden.reshape(-1, hidden.shape[-1])
        total, grad, count = _forward(h, weight, bias, labels.reshape(-1), block,
                                      ctx.needs_input_grad[0])
        if grad is not None:  # HF's mean divides by the labelled tokens (0/0: nan, as HF)
            grad = grad.div_(count) if scale is None else grad.mul_(scale)
            ctx.save_for_backward(grad.reshape(hidden.shape))
        return total / count if scale is None else total * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None
