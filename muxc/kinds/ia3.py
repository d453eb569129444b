"""IA3: the base op's output (attention) or input (feed-forward) scaled elementwise by a
learned vector."""

from __future__ import annotations

import torch
from peft.tuners.ia3.layer import Linear as IA3Linear

# PEFT's layers on bitsandbytes-quantized bases (QLoRA), named (not imported: importing them
# imports bitsandbytes, which a process without a quantized model does not need)
_QUANT_LAYERS = ("peft.tuners.ia3.bnb.Linear4bit", "peft.tuners.ia3.bnb.Linear8bitLt")

from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kernels import multi_ia3
from muxc.kernels.replay import derive
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["IA3", "ia3_adapter"]


@torch.library.custom_op("muxc::ia3_adapter", mutates_args=())
def ia3_adapter(t: torch.Tensor, v: torch.Tensor, site: str) -> torch.Tensor:
    """``t * v`` along the last axis (PEFT IA3; ``v`` of any shape with ``t.shape[-1]`` elements)."""
    return (t.to(v.dtype) * v.reshape(-1)).to(t.dtype)


@ia3_adapter.register_fake
def _(t, v, site):
    return torch.empty_like(t)


def _setup(ctx, inputs, output):
    t, v, site = inputs
    ctx.save_for_backward(t, v)


def _backward(ctx, dz):
    t, v = ctx.saved_tensors
    vf = v.reshape(-1)
    dt = (dz.to(v.dtype) * vf).to(t.dtype)
    dv = (dz.to(v.dtype) * t.to(v.dtype)).reshape(-1, vf.numel()).sum(0).reshape(v.shape)
    return dt, dv, None


ia3_adapter.register_autograd(_backward, setup_context=_setup)


def _holds(mod, adapter: str) -> bool:
    return adapter in getattr(mod, "ia3_l", {})


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    ff = bool(mod.is_feedforward)
    return AdapterRecord(
        task=task,
        site=path,
        kind=AdapterKind.IA3,
        dispatch=Dispatch.PRE if ff else Dispatch.OUTPUT,
        aggregate=Aggregate.SCALE_INPUT if ff else Aggregate.SCALE_OUTPUT,
        params={"v": mod.ia3_l[adapter]},
        param_names={"v": f"{path}.ia3_l.{adapter}"},
        rank=0,
    )


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        v = self.ia3_l[adapter]
        if self.is_feedforward:
            return self.base_layer(ia3_adapter(x, v, site), *args, **kwargs)
        return ia3_adapter(self.base_layer(x, *args, **kwargs), v, site)

    return forward


def _apply(site, x: torch.Tensor, t: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """``t * v`` on every IA3 task's segment (a ones vector for the others)."""
    dtype = next(iter(recs.values())).params["v"].dtype
    k = t.shape[-1]
    flat = derive(t, lambda v: v.reshape(-1, k))
    ones = None
    vectors = []
    for task in mux.tasks:
        if task in recs:
            vectors.append(params[task]["v"].reshape(-1))
        else:
            if ones is None:
                ones = torch.ones(flat.shape[1], dtype=dtype, device=flat.device)
            vectors.append(ones)
    z = multi_ia3(derive(flat, lambda v: v.to(dtype)), mux.seg_lens, vectors, impl=mux.impl)
    return z.to(t.dtype).view(t.shape)


IA3 = AdapterKindSpec(
    kind=AdapterKind.IA3,
    peft_type="IA3",
    peft_layers=(IA3Linear, *_QUANT_LAYERS),
    config_problems=lambda cfg: [],
    holds=_holds,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.ia3_adapter.default,
    adapted_arg=0,
    input_arg=None,
    param_args=(1, 2),
    kernel_op="multi_ia3",
    apply=_apply,
    cost_op="ia3",
    cost_dims=lambda k, n, r, pre: (k if pre else n,),
    flops_per_token=lambda k, n, r, pre: float(k if pre else n),
    numel=lambda k, n, r, pre: k if pre else n,
    adds_to_output=False,
)
