"""A task head: the trainable per-task copy PEFT keeps of a sequence-classification model's
``score``/``classifier`` Linear (``modules_to_save``, added by ``task_type="SEQ_CLS"``).

The head is not an adapter at a backbone site: it reads the backbone's last hidden state and
feeds the task's loss (`muxc.ir.SeqClsLoss`: HF's last-non-padding-token pooling and its
single-label / multi-label / regression loss). It is one kind entry so tracing keeps it one
opaque node and the task's optimizer, gradients and checkpoints see its parameters like any
adapter's. Each task holds its own copy once; the frozen original PEFT keeps beside it is
never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.utils.other import ModulesToSaveWrapper

from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["HEAD", "task_head", "head_module"]


@torch.library.custom_op("muxc::task_head", mutates_args=())
def task_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: str) -> torch.Tensor:
    """``hidden @ weight.T + bias``: one task's head on every token (pooled by its loss)."""
    return F.linear(hidden.to(weight.dtype), weight, bias)


@task_head.register_fake
def _(hidden, weight, bias, site):
    return hidden.new_empty(*hidden.shape[:-1], weight.shape[0], dtype=weight.dtype)


def _setup(ctx, inputs, output):
    hidden, weight, bias, site = inputs
    ctx.save_for_backward(hidden, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    hidden, weight = ctx.saved_tensors
    flat = dy.reshape(-1, dy.shape[-1])
    dw = flat.t() @ hidden.to(weight.dtype).reshape(-1, hidden.shape[-1])
    db = flat.sum(0) if ctx.has_bias else None
    return (dy @ weight).to(hidden.dtype), dw, db, None


task_head.register_autograd(_backward, setup_context=_setup)


def head_module(mod, adapter: str) -> torch.nn.Linear | None:
    """The task's trainable copy inside a ModulesToSaveWrapper (None if it holds none)."""
    copies = getattr(mod, "modules_to_save", None)
    if not isinstance(mod, ModulesToSaveWrapper) or copies is None or adapter not in copies:
        return None
    return copies[adapter]


def _holds(mod, adapter: str) -> bool:
    return head_module(mod, adapter) is not None


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    lin = head_module(mod, adapter)
    params = {"weight": lin.weight}
    names = {"weight": f"{path}.modules_to_save.{adapter}.weight"}
    if lin.bias is not None:
        params["bias"] = lin.bias
        names["bias"] = f"{path}.modules_to_save.{adapter}.bias"
    return AdapterRecord(task=task, site=path, kind=AdapterKind.HEAD, dispatch=Dispatch.OUTPUT,
                         aggregate=Aggregate.REPLACE, params=params, param_names=names,
                         rank=int(lin.weight.shape[0]))


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        lin = self.modules_to_save[adapter]
        return task_head(x, lin.weight, lin.bias, site)

    return forward


def _no_site(*args, **kwargs):
    raise NotImplementedError("a task head runs in its task's loss, never at a backbone site")


HEAD = AdapterKindSpec(
    kind=AdapterKind.HEAD,
    peft_type="*",  # any PEFT type may carry a head (modules_to_save)
    peft_layers=(ModulesToSaveWrapper,),
    config_problems=lambda cfg: [],
    holds=_holds,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.task_head.default,
    adapted_arg=0,
    input_arg=None,
    param_args=(1, 3),
    kernel_op="",
    apply=_no_site,
    cost_op="gemm",
    cost_dims=lambda k, n, r, pre: (k, r),
    flops_per_token=lambda k, n, r, pre: 0.0,  # charged per pooled row by the loss
    numel=lambda k, n, r, pre: k * r + r,
    adds_to_output=False,
    is_head=True,
)
