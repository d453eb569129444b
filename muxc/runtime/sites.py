"""How the merged graph's adapter sites run (bound to `muxc.ir.OutputSite`/`InputSite`).

A site lays out the active tasks' adapters in the step's segment order (a task without an
adapter here gets a rank-0 LoRA / a ones IA3 vector, so its tokens pass through unchanged) and
makes ONE multi-task kernel call per adapter kind, whatever the number of tasks. All per-step
facts come from the `MuxBatch` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muxc.errors import MuxcInternalError
from muxc.ir import AdapterKind, InputSite, MuxBatch, OutputSite, bind_site_impl
from muxc.ir.ops import common_dtype
from muxc.kernels import multi_ia3, multi_lora

__all__ = ["run_output_site", "run_input_site"]


def _flat(t: torch.Tensor, mux: MuxBatch, what: str) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[0] != mux.tokens():
        raise MuxcInternalError(
            f"{what}: {tuple(t.shape)} does not flatten to the step's {mux.tokens()} tokens"
        )
    return flat


def _by_kind(site, kind: AdapterKind):
    return {r.task: r for r in site.records if r.kind is kind}


def _ia3(site, t: torch.Tensor, mux: MuxBatch, params, recs) -> torch.Tensor:
    if not any(task in recs for task in mux.tasks):
        return t
    flat = _flat(t, mux, f"site {site.site}")
    dtype = common_dtype(tuple(recs.values()), site.site)
    ones = None
    vectors = []
    for task in mux.tasks:
        if task in recs:
            vectors.append(params[task]["v"].reshape(-1))
        else:
            if ones is None:
                ones = torch.ones(flat.shape[1], dtype=dtype, device=flat.device)
            vectors.append(ones)
    z = multi_ia3(flat.to(dtype), mux.seg_lens, vectors, impl=mux.impl)
    return z.to(t.dtype).view(t.shape)


def _lora(site, x, mux: MuxBatch, params, recs) -> torch.Tensor:
    flat = _flat(x, mux, f"site {site.site}")
    dtype = common_dtype(tuple(recs.values()), site.site)
    flat = flat.to(dtype)
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
        flat = _segment_dropout(flat, mux.seg_lens, drops)
    return multi_lora(flat, mux.seg_lens, a_list, b_list, scaling, impl=mux.impl)


def run_output_site(site: OutputSite, x, h, mux: MuxBatch, *flat_params) -> torch.Tensor:
    """``h + s*B(A(x))`` on LoRA tasks' segments, then ``* v`` on IA3 tasks' segments."""
    params = site.params_by_task(flat_params)
    out = h
    loras = _by_kind(site, AdapterKind.LORA)
    if any(task in loras for task in mux.tasks):
        out = out + _lora(site, x, mux, params, loras).view(h.shape).to(h.dtype)
    return _ia3(site, out, mux, params, _by_kind(site, AdapterKind.IA3))


def run_input_site(site: InputSite, x, mux: MuxBatch, *flat_params) -> torch.Tensor:
    """``x * v`` on IA3 feed-forward tasks' segments."""
    params = site.params_by_task(flat_params)
    return _ia3(site, x, mux, params, _by_kind(site, AdapterKind.IA3))


def _segment_dropout(flat: torch.Tensor, seg_lens, probs) -> torch.Tensor:
    """Dropout with probability ``probs[i]`` on segment ``i`` (PEFT's lora_dropout)."""
    if len(set(probs)) == 1:
        return F.dropout(flat, probs[0], training=True)
    parts = torch.split(flat, list(seg_lens))
    return torch.cat([F.dropout(p, q, training=True) if q > 0 else p for p, q in zip(parts, probs)])


bind_site_impl(OutputSite, run_output_site)
bind_site_impl(InputSite, run_input_site)
