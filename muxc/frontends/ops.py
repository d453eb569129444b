"""Opaque single-task adapter ops used while tracing a task.

While a task is exported, each PEFT adapter layer routes its adapter math through one of
these `torch.library.custom_op`s, so the adapter is ONE node in the exported graph whose
arguments are the base op's tensors, the adapter's own parameters and its site (module path).
They have real implementations and autograd, so a `TaskGraph` also runs on its own.
"""

from __future__ import annotations

import torch

__all__ = ["lora_adapter", "ia3_adapter", "ADAPTER_OPS"]


@torch.library.custom_op("muxc::lora_adapter", mutates_args=())
def lora_adapter(
    x: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, site: str
) -> torch.Tensor:
    """``h + scaling * B(A(x))`` for one task (PEFT LoRA, dropout applied by the runtime)."""
    return h + ((x.to(a.dtype) @ a.t() @ b.t()) * scaling).to(h.dtype)


@lora_adapter.register_fake
def _(x, h, a, b, scaling, site):
    return torch.empty_like(h)


def _lora_setup(ctx, inputs, output):
    x, h, a, b, scaling, site = inputs
    ctx.save_for_backward(x, a, b)
    ctx.scaling = scaling


def _lora_backward(ctx, dy):
    x, a, b = ctx.saved_tensors
    g = dy.to(a.dtype) * ctx.scaling
    gb = g @ b  # (..., r)
    dx = (gb @ a).to(x.dtype)
    da = gb.reshape(-1, gb.shape[-1]).t() @ x.to(a.dtype).reshape(-1, x.shape[-1])
    db = g.reshape(-1, g.shape[-1]).t() @ (x.to(a.dtype) @ a.t()).reshape(-1, a.shape[0])
    return dx, dy, da, db, None, None


lora_adapter.register_autograd(_lora_backward, setup_context=_lora_setup)


@torch.library.custom_op("muxc::ia3_adapter", mutates_args=())
def ia3_adapter(t: torch.Tensor, v: torch.Tensor, site: str) -> torch.Tensor:
    """``t * v`` along the last axis (PEFT IA3; ``v`` of any shape with ``t.shape[-1]`` elements)."""
    return (t.to(v.dtype) * v.reshape(-1)).to(t.dtype)


@ia3_adapter.register_fake
def _(t, v, site):
    return torch.empty_like(t)


def _ia3_setup(ctx, inputs, output):
    t, v, site = inputs
    ctx.save_for_backward(t, v)


def _ia3_backward(ctx, dz):
    t, v = ctx.saved_tensors
    vf = v.reshape(-1)
    dt = (dz.to(v.dtype) * vf).to(t.dtype)
    dv = (dz.to(v.dtype) * t.to(v.dtype)).reshape(-1, vf.numel()).sum(0).reshape(v.shape)
    return dt, dv, None


ia3_adapter.register_autograd(_ia3_backward, setup_context=_ia3_setup)

ADAPTER_OPS = {
    torch.ops.muxc.lora_adapter.default: "lora",
    torch.ops.muxc.ia3_adapter.default: "ia3",
}
