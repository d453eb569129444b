"""A task's trainable copy of a backbone module (``modules_to_save`` off the output head,
BitFit-style: e.g. ``LoraConfig(modules_to_save=["model.layers.0.mlp.up_proj"])`` or a
LayerNorm).

PEFT wraps the module in a ``ModulesToSaveWrapper``: the task runs its own trainable deep copy
instead of the frozen original. In the merged graph the original stays the shared frozen op (it
runs for every task's tokens), and the site REPLACES the task's token segment of its output by
the copy applied to the segment's input::

    y[task] = copy(x[task])      (nn.Linear, GPT-2 Conv1D: x W^T + b;  nn.LayerNorm)

so the task's gradient reaches its copy's weight and bias, and its input gradient comes from
the copy only, exactly as alone. Supported module types: ``nn.Linear``, GPT-2 ``Conv1D`` and
``nn.LayerNorm``; others (RMSNorm variants, embeddings, whole blocks) raise
`UnsupportedPeftError` naming the module. A module cannot be both copied and a LoRA target
(PEFT refuses that itself).

Record fields: ``rank`` is a linear copy's output width (0 for a LayerNorm), ``scaling`` a
LayerNorm's ``eps`` (0 for a linear), ``fan_in_fan_out`` marks a Conv1D (weight stored ``(in,
out)``). Priced as one GEMM of the op's shape per task token (a Linear copy's backward also
computes dW, which that omits; a LayerNorm copy costs less than that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from muxc.errors import UnsupportedPeftError
from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["MODULE_COPY", "module_copy", "copy_of", "check_copyable"]

_TYPES = (torch.nn.Linear, Conv1D, torch.nn.LayerNorm)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
         fifo: bool) -> torch.Tensor:
    if weight.dim() == 1:  # LayerNorm
        return F.layer_norm(x.to(weight.dtype), (weight.shape[0],), weight, bias, eps)
    return F.linear(x.to(weight.dtype), weight.t() if fifo else weight, bias)


@torch.library.custom_op("muxc::module_copy", mutates_args=())
def module_copy(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                eps: float, fan_in_fan_out: bool, site: str) -> torch.Tensor:
    """The task's copy of the module on ``x`` (``h``, the frozen original's output, is what it
    replaces: its gradient is zero)."""
    return _run(x, weight, bias, eps, fan_in_fan_out).to(h.dtype)


@module_copy.register_fake
def _(x, h, weight, bias, eps, fan_in_fan_out, site):
    return torch.empty_like(h)


def _setup(ctx, inputs, output):
    x, h, weight, bias, eps, fifo, site = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps, ctx.fifo, ctx.h_dtype = eps, fifo, h.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        wd = weight.detach().requires_grad_(True)
        bd = bias.detach().requires_grad_(True) if ctx.has_bias else None
        out = _run(xd, wd, bd, ctx.eps, ctx.fifo)
        leaves = (xd, wd) + ((bd,) if ctx.has_bias else ())
        grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    dx, dw = grads[0], grads[1]
    db = grads[2] if ctx.has_bias else None
    return dx.to(x.dtype), torch.zeros_like(dy, dtype=ctx.h_dtype), dw, db, None, None, None


module_copy.register_autograd(_backward, setup_context=_setup)


def copy_of(mod, adapter: str) -> torch.nn.Module | None:
    """The task's trainable copy inside a ModulesToSaveWrapper (None if it holds none)."""
    copies = getattr(mod, "modules_to_save", None)
    return copies[adapter] if copies is not None and adapter in copies else None


def check_copyable(task: str, path: str, mod, adapter: str, supported: str) -> None:
    """Raise `UnsupportedPeftError` unless the copy is a module type muxc runs."""
    copy = copy_of(mod, adapter)
    ok = isinstance(copy, _TYPES) and getattr(copy, "weight", None) is not None
    if isinstance(copy, torch.nn.LayerNorm) and len(copy.normalized_shape) != 1:
        ok = False
    if not ok:
        raise UnsupportedPeftError(
            f"task {task!r}: modules_to_save module {path!r} ({type(copy).__name__}) is not the "
            "model's output head and not a module muxc copies per task: supported are nn.Linear, "
            f"GPT-2 Conv1D and nn.LayerNorm (with a weight) anywhere, and the output head; "
            f"supported: {supported}"
        )


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    copy = copy_of(mod, adapter)
    params = {"weight": copy.weight}
    names = {"weight": f"{path}.modules_to_save.{adapter}.weight"}
    if copy.bias is not None:
        params["bias"] = copy.bias
        names["bias"] = f"{path}.modules_to_save.{adapter}.bias"
    norm = isinstance(copy, torch.nn.LayerNorm)
    return AdapterRecord(
        task=task, site=path, kind=AdapterKind.COPY, dispatch=Dispatch.PARALLEL,
        aggregate=Aggregate.REPLACE, params=params, param_names=names,
        rank=0 if norm else int(copy.weight.shape[1 if isinstance(copy, Conv1D) else 0]),
        scaling=float(copy.eps) if norm else 0.0,
        fan_in_fan_out=isinstance(copy, Conv1D),
    )


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        h = self.original_module(x, *args, **kwargs)
        copy = self.modules_to_save[adapter]
        eps = float(copy.eps) if isinstance(copy, torch.nn.LayerNorm) else 0.0
        return module_copy(x, h, copy.weight, copy.bias, eps, isinstance(copy, Conv1D), site)

    return forward


def _apply(site, x: torch.Tensor, t: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """Every copying task's segment of ``t`` replaced by its copy on its segment of ``x``."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat = t.reshape(-1, t.shape[-1])
    xs = torch.split(flat_x, list(mux.seg_lens))
    parts = torch.split(flat, list(mux.seg_lens))
    out = []
    for task, xp, p in zip(mux.tasks, xs, parts):
        if task in recs:
            r, w = recs[task], params[task]
            p = _run(xp, w["weight"], w.get("bias"), r.scaling, r.fan_in_fan_out).to(p.dtype)
        out.append(p)
    return torch.cat(out).view(t.shape)


MODULE_COPY = AdapterKindSpec(
    kind=AdapterKind.COPY,
    peft_type="*",  # any PEFT type may carry modules_to_save
    peft_layers=(),  # found by `muxc.frontends.peft` (ModulesToSaveWrapper off the head)
    config_problems=lambda cfg: [],
    holds=lambda mod, adapter: False,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.module_copy.default,
    adapted_arg=1,
    input_arg=0,
    param_args=(2, 4),
    kernel_op="",
    apply=_apply,
    cost_op="gemm",
    cost_dims=lambda k, n, r, pre: (k, n),
    flops_per_token=lambda k, n, r, pre: 2.0 * k * n,
    numel=lambda k, n, r, pre: k * n + n if r else 2 * n,
    adds_to_output=False,
    for_config=lambda cfg: False,  # never a config's kind
)
