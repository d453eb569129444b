"""How the merged graph's adapter sites run (bound to `muxc.ir.OutputSite`/`InputSite`).

A site lays out the active tasks' adapters in the step's segment order and makes ONE
multi-task kernel call per adapter kind present (the kind's `AdapterKindSpec.apply`; a task
without that kind here gets a neutral adapter, so its tokens pass through unchanged). All
per-step facts come from the `MuxBatch` argument.
"""

from __future__ import annotations

import torch

from muxc.errors import MuxcInternalError
from muxc.ir import InputSite, LMHeadLoss, MuxBatch, OutputSite, bind_site_impl
from muxc.kernels.lm_head_loss import lm_head_loss
from muxc.kinds import KINDS

__all__ = ["run_output_site", "run_input_site"]


def _check_tokens(t: torch.Tensor, mux: MuxBatch, site: str) -> None:
    if t.numel() // t.shape[-1] != mux.tokens():
        raise MuxcInternalError(
            f"site {site}: {tuple(t.shape)} does not flatten to the step's {mux.tokens()} tokens"
        )


def _apply_kinds(site, x: torch.Tensor, t: torch.Tensor, mux: MuxBatch, flat) -> torch.Tensor:
    n = len(site.frozen)
    frozen = dict(zip(site.frozen, flat[:n]))
    params = site.params_by_task(flat[n:])
    by_kind = site.by_kind
    for kind, spec in KINDS.items():
        recs = by_kind.get(kind)
        if recs is not None and any(task in recs for task in mux.tasks):
            _check_tokens(t, mux, site.site)
            t = spec.apply(site, x, t, mux, params, recs, frozen=frozen)
    return t


def run_output_site(site: OutputSite, x, h, mux: MuxBatch, *flat_params) -> torch.Tensor:
    """Every task's adapter on the base op's output ``h`` (reading its input ``x`` and the
    frozen tensors named by ``site.frozen``, which come first in ``flat_params``)."""
    return _apply_kinds(site, x, h, mux, flat_params)


def run_input_site(site: InputSite, x, mux: MuxBatch, *flat_params) -> torch.Tensor:
    """Every task's input-side adapter (IA3 feed-forward) on the base op's input ``x``."""
    return _apply_kinds(site, x, x, mux, flat_params)


bind_site_impl(OutputSite, run_output_site)
bind_site_impl(InputSite, run_input_site)
bind_site_impl(LMHeadLoss, lm_head_loss)  # the fused frozen LM head + loss (a kernel, no site)
