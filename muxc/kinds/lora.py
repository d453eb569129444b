"""LoRA: ``h + scaling * B(A(dropout(x)))`` on a Linear / Conv1D base op (rsLoRA, rank and alpha
patterns and dropout included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

# PEFT's layers on bitsandbytes-quantized bases (QLoRA), named (not imported: importing them
# imports bitsandbytes, which a process without a quantized model does not need)
_QUANT_LAYERS = ("peft.tuners.lora.bnb.Linear4bit", "peft.tuners.lora.bnb.Linear8bitLt")

from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kernels import multi_lora
from muxc.kernels.replay import derive
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["LORA", "lora_adapter", "config_problems", "segment_dropout"]


@torch.library.custom_op("muxc::lora_adapter", mutates_args=())
def lora_adapter(
    x: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, site: str
) -> torch.Tensor:
    """``h + scaling * B(A(x))`` for one task (PEFT LoRA, dropout applied by the runtime)."""
    return h + ((x.to(a.dtype) @ a.t() @ b.t()) * scaling).to(h.dtype)


@lora_adapter.register_fake
def _(x, h, a, b, scaling, site):
    return torch.empty_like(h)


def _setup(ctx, inputs, output):
    x, h, a, b, scaling, site = inputs
    ctx.save_for_backward(x, a, b)
    ctx.scaling = scaling


def _backward(ctx, dy):
    x, a, b = ctx.saved_tensors
    g = dy.to(a.dtype) * ctx.scaling
    gb = g @ b  # (..., r)
    dx = (gb @ a).to(x.dtype)
    da = gb.reshape(-1, gb.shape[-1]).t() @ x.to(a.dtype).reshape(-1, x.shape[-1])
    db = g.reshape(-1, g.shape[-1]).t() @ (x.to(a.dtype) @ a.t()).reshape(-1, a.shape[0])
    return dx, dy, da, db, None, None


lora_adapter.register_autograd(_backward, setup_context=_setup)


# LoraConfig options muxc does not run yet: (attribute, is it set?, how to name it)
_UNSUPPORTED = (
    ("bias", lambda v: v not in (None, "none", "all", "lora_only"), lambda v: f"bias={v!r}"),
    ("lora_bias", bool, lambda v: "lora_bias=True"),
    ("target_parameters", bool, lambda v: f"target_parameters={v}"),
    ("trainable_token_indices", bool, lambda v: "trainable_token_indices"),
    ("alora_invocation_tokens", bool, lambda v: "alora_invocation_tokens (aLoRA)"),
    ("use_qalora", bool, lambda v: "use_qalora=True"),
)


def config_problems(cfg) -> list[str]:
    out = []
    for attr, is_set, label in _UNSUPPORTED:
        value = getattr(cfg, attr, None)
        if is_set(value):
            out.append(label(value))
    return out


def _holds(mod, adapter: str) -> bool:
    return adapter in getattr(mod, "lora_A", {}) and adapter not in getattr(mod, "lora_magnitude_vector", {})


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    drop = mod.lora_dropout[adapter]
    return AdapterRecord(
        task=task,
        site=path,
        kind=AdapterKind.LORA,
        dispatch=Dispatch.PARALLEL,
        aggregate=Aggregate.ADD_SCALED,
        params={"A": a, "B": b},
        param_names={"A": f"{path}.lora_A.{adapter}.weight", "B": f"{path}.lora_B.{adapter}.weight"},
        rank=a.shape[0],
        scaling=float(mod.scaling[adapter]),
        dropout=float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0,
    )


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        h = self.base_layer(x, *args, **kwargs)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return lora_adapter(x, h, a, b, float(self.scaling[adapter]), site)

    return forward


def segment_dropout(flat: torch.Tensor, seg_lens, probs) -> torch.Tensor:
    """Dropout with probability ``probs[i]`` on segment ``i`` (PEFT's lora_dropout)."""
    if len(set(probs)) == 1:
        return F.dropout(flat, probs[0], training=True)
    parts = torch.split(flat, list(seg_lens))
    return torch.cat([F.dropout(p, q, training=True) if q > 0 else p for p, q in zip(parts, probs)])


def _apply(site, x: torch.Tensor, h: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """``h + s*B(A(x))`` on every LoRA task's segment (a rank-0 adapter for the others).

    The kernel adds into the base output in the same pass (fused accumulate) when ``h`` has
    the adapters' dtype, else ``h`` + the delta cast to it."""
    dtype = next(iter(recs.values())).params["A"].dtype
    k = x.shape[-1]
    flat = derive(x, lambda v: v.reshape(-1, k).to(dtype))
    n_out = next(iter(recs.values())).params["B"].shape[0]
    a_list, b_list, scaling, drops = [], [], [], []
    for task in mux.tasks:
        if task in recs:
            a_list.append(params[task]["A"])
            b_list.append(params[task]["B"])
            scaling.append(recs[task].scaling)
            drops.append(recs[task].dropout)
        else:
            a_list.append(flat.new_empty(0, flat.shape[1]))
            b_list.append(flat.new_empty(n_out, 0))
            scaling.append(0.0)
            drops.append(0.0)
    if mux.training and any(p > 0 for p in drops):
        flat = segment_dropout(flat, mux.seg_lens, drops)
    if h.dtype == dtype:
        base = h.reshape(-1, h.shape[-1])
        out = multi_lora(flat, mux.seg_lens, a_list, b_list, scaling, impl=mux.impl, base=base)
        return out.view(h.shape)
    delta = multi_lora(flat, mux.seg_lens, a_list, b_list, scaling, impl=mux.impl)
    return h + delta.view(h.shape).to(h.dtype)


LORA = AdapterKindSpec(
    kind=AdapterKind.LORA,
    peft_type="LORA",
    peft_layers=(LoraLinear, *_QUANT_LAYERS),
    config_problems=config_problems,
    holds=_holds,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.lora_adapter.default,
    adapted_arg=1,
    input_arg=0,
    param_args=(2, 4),
    kernel_op="multi_lora",
    apply=_apply,
    cost_op="lora",
    cost_dims=lambda k, n, r, pre: (k, n, r),
    flops_per_token=lambda k, n, r, pre: 2.0 * r * (k + n) + n,
    numel=lambda k, n, r, pre: r * (k + n),
    adds_to_output=True,
    for_config=lambda cfg: not getattr(cfg, "use_dora", False),
)
