"""DoRA (``LoraConfig(use_dora=True)``): LoRA whose merged weight is renormalised per output
unit by a trained magnitude vector.

PEFT (``peft/tuners/lora/dora.py``, ``DoraLinearLayer.forward``) computes, for base weight ``W``
(``(out, in)`` after undoing ``fan_in_fan_out``), bias ``b`` and base output ``h = x W^T + b``::

    norm   = ||W + s * (B @ A).detach()||_2 per output row      (detached: no gradient)
    scale  = m / norm                                           (gradient reaches m only)
    y      = h + (scale - 1) * (h - b) + scale * s * B(A(x))

(with LoRA dropout active, ``h - b`` is replaced by ``dropout(x) W^T`` and ``x`` by
``dropout(x)`` in the LoRA term). With bias training (``bias="all"``/``"lora_only"``) ``b`` is
the task's own trained bias: the bias kind runs first at the site and moves ``h`` onto it, and
``h - b`` subtracts that same tensor, so the bias gets PEFT's gradient (the sum of ``dy``).

A site serves every DoRA task at once: the weight norms of all
its DoRA tasks come from one batched GEMM (ranks zero-padded to the largest, which adds exact
zeros), the LoRA terms from ONE `multi_lora` call over all segments (the other tasks get a
rank-0 adapter), and the renormalisation is elementwise over per-segment scale rows.

Kernels: the LoRA term uses `multi_lora` (Triton on CUDA, the grouped path on CPU). The norm
and the elementwise combination stay in torch on every device: the norm is a dense
``(out, r) @ (r, in)`` GEMM per task (cuBLAS ``bmm`` is already the right kernel for it) and the
combination is a handful of pointwise ops over the output that a dedicated kernel would only
fuse, not shorten. A site's extra cost over LoRA is that GEMM plus an ``(out, in)`` temporary
per DoRA task per call, and ~4 pointwise passes over the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kernels import multi_lora
from muxc.kinds.lora import config_problems as _lora_problems
from muxc.kinds.lora import segment_dropout
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["DORA", "dora_adapter", "weight_norms"]


def _oriented(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return w.t() if fan_in_fan_out else w


@torch.library.custom_op("muxc::dora_adapter", mutates_args=())
def dora_adapter(
    x: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    site: str,
) -> torch.Tensor:
    """One task's DoRA output (module doc; dropout is applied by the runtime)."""
    scale = m / weight_norms(w, fan_in_fan_out, [a], [b], [scaling])[0]
    base = h if bias is None else h - bias
    lora = (x.to(a.dtype) @ a.t() @ b.t()) * scaling
    return (h + (scale - 1) * base + scale * lora).to(h.dtype)


@dora_adapter.register_fake
def _(x, h, w, bias, a, b, m, scaling, fan_in_fan_out, site):
    return torch.empty_like(h)


def _setup(ctx, inputs, output):
    x, h, w, bias, a, b, m, scaling, fifo, site = inputs
    ctx.save_for_backward(x, h, w, bias, a, b, m)
    ctx.scaling, ctx.fifo = scaling, fifo


def _backward(ctx, dy):
    x, h, w, bias, a, b, m = ctx.saved_tensors
    s = ctx.scaling
    norm = weight_norms(w, ctx.fifo, [a], [b], [s])[0]
    scale = m / norm
    g = dy.to(a.dtype)
    u = x.to(a.dtype) @ a.t()
    base = h if bias is None else h - bias
    dm = ((g * (base + (u @ b.t()) * s)).reshape(-1, m.numel()).sum(0) / norm).to(m.dtype)
    gl = g * scale * s
    gb = gl @ b
    dx = (gb @ a).to(x.dtype)
    da = gb.reshape(-1, gb.shape[-1]).t() @ x.to(a.dtype).reshape(-1, x.shape[-1])
    db = gl.reshape(-1, gl.shape[-1]).t() @ u.reshape(-1, u.shape[-1])
    dh = (g * scale).to(h.dtype)
    return dx, dh, None, None, da, db, dm, None, None, None


dora_adapter.register_autograd(_backward, setup_context=_setup)


@torch.no_grad()
def weight_norms(w: torch.Tensor, fan_in_fan_out: bool, a_list, b_list, scaling) -> torch.Tensor:
    """``||W + s_i * B_i @ A_i||`` per output row for every task ``i`` at once: ``(tasks, out)``.

    One batched GEMM: ranks are zero-padded to the largest (the padding adds exact zeros).
    Computed without gradient, as PEFT detaches it.
    """
    wt = _oriented(w, fan_in_fan_out)
    dtype = a_list[0].dtype
    rmax = max(a.shape[0] for a in a_list)
    n, k = wt.shape
    bp = torch.zeros(len(a_list), n, rmax, dtype=dtype, device=wt.device)
    ap = torch.zeros(len(a_list), rmax, k, dtype=dtype, device=wt.device)
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        ap[i, : a.shape[0]] = a
        bp[i, :, : b.shape[1]] = b
    s = torch.tensor(scaling, dtype=dtype, device=wt.device).view(-1, 1, 1)
    merged = wt.to(dtype).unsqueeze(0) + s * torch.bmm(bp, ap)
    return torch.linalg.norm(merged, dim=2).to(dtype)


def config_problems(cfg) -> list[str]:
    """LoRA's (bias training is supported: `_apply` subtracts the task's own bias)."""
    return _lora_problems(cfg)


def _for_config(cfg) -> bool:
    return bool(getattr(cfg, "use_dora", False))


def _holds(mod, adapter: str) -> bool:
    return adapter in getattr(mod, "lora_magnitude_vector", {})


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    m = mod.lora_magnitude_vector[adapter].weight
    drop = mod.lora_dropout[adapter]
    return AdapterRecord(
        task=task,
        site=path,
        kind=AdapterKind.DORA,
        dispatch=Dispatch.PARALLEL,
        aggregate=Aggregate.DORA,
        params={"A": a, "B": b, "m": m},
        param_names={
            "A": f"{path}.lora_A.{adapter}.weight",
            "B": f"{path}.lora_B.{adapter}.weight",
            "m": f"{path}.lora_magnitude_vector.{adapter}.weight",
        },
        rank=a.shape[0],
        scaling=float(mod.scaling[adapter]),
        dropout=float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0,
        fan_in_fan_out=bool(getattr(mod, "fan_in_fan_out", False)),
    )


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        h = self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        m = self.lora_magnitude_vector[adapter].weight
        return dora_adapter(x, h, base.weight, base.bias, a, b, m, float(self.scaling[adapter]),
                            bool(self.fan_in_fan_out), site)

    return forward


def _apply(site, x: torch.Tensor, h: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """Every DoRA task's output on its segment; other tasks' rows are left as they are."""
    first = next(iter(recs.values()))
    dtype = first.params["A"].dtype
    w, bias = frozen["weight"], frozen.get("bias")
    flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
    flat_h = h.reshape(-1, h.shape[-1])
    n_out = flat_h.shape[1]
    mine = [t for t in mux.tasks if t in recs]
    norms = weight_norms(w, first.fan_in_fan_out, [params[t]["A"] for t in mine],
                         [params[t]["B"] for t in mine], [recs[t].scaling for t in mine])
    a_list, b_list, scaling, drops, scales = [], [], [], [], []
    ones = None
    for task in mux.tasks:
        if task in recs:
            p = params[task]
            a_list.append(p["A"])
            b_list.append(p["B"])
            scaling.append(recs[task].scaling)
            drops.append(recs[task].dropout if mux.training else 0.0)
            scales.append(p["m"].reshape(-1) / norms[mine.index(task)])
        else:
            a_list.append(flat_x.new_empty(0, flat_x.shape[1]))
            b_list.append(flat_x.new_empty(n_out, 0))
            scaling.append(0.0)
            drops.append(0.0)
            if ones is None:
                ones = torch.ones(n_out, dtype=dtype, device=flat_x.device)
            scales.append(ones)
    lens = torch.tensor(mux.seg_lens, device=flat_x.device)
    scale = torch.repeat_interleave(torch.stack(scales), lens, dim=0)
    base = flat_h.to(dtype)
    if bias is not None:
        # ``h`` carries each task's own bias where it trains one (the bias kind ran first at
        # this site), the shared snapshot elsewhere: subtract that one, as PEFT subtracts
        # ``base_layer.bias``
        own = [params[t]["bias"] if "bias" in params.get(t, {}) else bias for t in mux.tasks]
        if all(b is bias for b in own):
            base = base - bias.to(dtype)
        else:
            base = base - torch.repeat_interleave(torch.stack(own).to(dtype), lens, dim=0)
    if any(p > 0 for p in drops):
        flat_x = segment_dropout(flat_x, mux.seg_lens, drops)
        dropped = F.linear(flat_x, _oriented(w, first.fan_in_fan_out).to(dtype))
        parts = zip(torch.split(base, list(mux.seg_lens)), torch.split(dropped, list(mux.seg_lens)), drops)
        base = torch.cat([d if p > 0 else b for b, d, p in parts])
    lora = multi_lora(flat_x, mux.seg_lens, a_list, b_list, scaling, impl=mux.impl)
    out = flat_h.to(dtype) + (scale - 1) * base + scale * lora
    return out.to(h.dtype).view(h.shape)


def _flops_per_call(k: int, n: int, r: int, pre: bool) -> float:
    return 2.0 * n * r * k + 3.0 * n * k  # B @ A, + W, square-and-sum


DORA = AdapterKindSpec(
    kind=AdapterKind.DORA,
    peft_type="LORA",
    peft_layers=(LoraLinear,),
    config_problems=config_problems,
    holds=_holds,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.dora_adapter.default,
    adapted_arg=1,
    input_arg=0,
    param_args=(4, 7),
    kernel_op="multi_lora",
    apply=_apply,
    cost_op="lora",
    cost_dims=lambda k, n, r, pre: (k, n, r),
    flops_per_token=lambda k, n, r, pre: 2.0 * r * (k + n) + 5.0 * n,
    numel=lambda k, n, r, pre: r * (k + n) + n,
    adds_to_output=True,
    for_config=_for_config,
    frozen_args=(2, 3),
    frozen_names=("weight", "bias"),
    per_call_gemm=lambda k, n, r, pre: ((r, k), n),
    flops_per_call=_flops_per_call,
    per_call_passes=3.0,  # the norm: read the (N, K) product, square, sum
)
