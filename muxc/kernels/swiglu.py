"""`swiglu(gate, up)`: ``silu(gate) * up`` keeping two tensors for backward, not three.

A gated MLP (Llama, Mistral, Qwen, ...) computes ``down(silu(gate(x)) * up(x))``. Run as two
ops, autograd keeps ``gate`` (for silu's backward) and both factors of the product,
``silu(gate)`` and ``up``: three ``tokens x intermediate`` tensors per layer, the largest
saved activations of such a model. This op keeps ``gate`` and ``up`` only and recomputes
``silu(gate)`` in backward (one elementwise pass). Forward and backward run the same ATen
kernels as the unfused ops, in the same order (``silu``, ``mul``; ``mul``, ``silu_backward``),
so losses and gradients are bit for bit the same.

>>> g = torch.randn(3, 4, requires_grad=True); u = torch.randn(3, 4, requires_grad=True)
>>> bool((swiglu(g, u) == torch.nn.functional.silu(g) * u).all())
True
"""

from __future__ import annotations

import torch

__all__ = ["swiglu"]

aten = torch.ops.aten


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        need_gate, need_up = ctx.needs_input_grad
        # d/d up needs silu(gate); d/d gate needs up and gate
        ctx.save_for_backward(gate if (need_gate or need_up) else None, up if need_gate else None)
        return aten.mul.Tensor(aten.silu.default(gate), up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        d_up = aten.mul.Tensor(grad, aten.silu.default(gate)) if need_up else None
        d_gate = aten.silu_backward.default(aten.mul.Tensor(grad, up), gate) if need_gate else None
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes), saving ``gate`` and ``up`` for backward (module doc)."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return aten.mul.Tensor(aten.silu.default(gate), up)
    return _SwiGLU.apply(gate, up)
