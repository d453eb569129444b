"""Prefix tuning (PEFT ``PrefixTuningConfig``): trained K/V prepended at every attention call.

Unlike the other kinds it adapts no base layer: PEFT keeps the prefix encoder on the
``PeftModel`` (``prompt_encoder[adapter]``) and hands the base model a pre-filled cache. muxc
reads the encoder's parameters into one `AdapterRecord` per task (roles
`muxc.ir.prefix.PREFIX_ROLES`; ``rank`` is the number of virtual tokens), traces the plain base
model, and `muxc.passes.rewrite_attention` swaps each attention node for a
`muxc.ir.PrefixAttention` reading those parameters (how it stays exact: `muxc.ir.prefix`). So
the spec has no trace op, layer or site: `traces` is False.
"""

from __future__ import annotations

import torch

from muxc.errors import MuxcInternalError
from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["PREFIX", "is_prefix", "prefix_records", "prefix_flops"]


def is_prefix(model, adapter: str) -> bool:
    """Does ``adapter`` of the PeftModel ``model`` do prefix tuning."""
    cfg = getattr(model, "peft_config", {}).get(adapter)
    return getattr(getattr(cfg, "peft_type", None), "value", None) == "PREFIX_TUNING"


def _problems(cfg) -> list[str]:
    bad = []
    if getattr(cfg, "num_transformer_submodules", 1) != 1:
        bad.append(f"num_transformer_submodules={cfg.num_transformer_submodules} (encoder-decoder)")
    task_type = getattr(getattr(cfg, "task_type", None), "value", getattr(cfg, "task_type", None))
    if task_type != "CAUSAL_LM":
        bad.append(f"task_type={task_type!r} (prefix tuning runs on causal LMs, task_type='CAUSAL_LM')")
    if getattr(cfg, "inference_mode", False):
        bad.append("inference_mode=True (a frozen prefix; load it with is_trainable=True)")
    return bad


def prefix_records(task: str, model, adapter: str) -> list[AdapterRecord]:
    """The task's prefix encoder as one record holding the user's own parameters."""
    enc = model.prompt_encoder[adapter]
    base = f"prompt_encoder.{adapter}"
    params = {"embedding": enc.embedding.weight}
    names = {"embedding": f"{base}.embedding.weight"}
    if getattr(enc, "prefix_projection", False):
        first, last = enc.transform[0], enc.transform[2]
        if not (isinstance(first, torch.nn.Linear) and isinstance(last, torch.nn.Linear)):
            raise MuxcInternalError(f"task {task!r}: unexpected prefix encoder {enc.transform}")
        params.update(w1=first.weight, b1=first.bias, w2=last.weight, b2=last.bias)
        names.update(w1=f"{base}.transform.0.weight", b1=f"{base}.transform.0.bias",
                     w2=f"{base}.transform.2.weight", b2=f"{base}.transform.2.bias")
    return [AdapterRecord(
        task=task, site=base, kind=AdapterKind.PREFIX, dispatch=Dispatch.ATTENTION,
        aggregate=Aggregate.PREFIX_KV, params=params, param_names=names,
        rank=int(enc.embedding.weight.shape[0]),
    )]


def prefix_flops(rec: AdapterRecord, layers: int) -> float:
    """Forward FLOPs of one layer's slice of the encoder (0 without ``prefix_projection``)."""
    if "w2" not in rec.params:
        return 0.0
    n = rec.rank
    hidden, token_dim = rec.params["w1"].shape
    return 2.0 * n * token_dim * hidden + 2.0 * n * hidden * rec.params["w2"].shape[0] / layers


def _unused(*args, **kwargs):
    raise MuxcInternalError("prefix tuning has no adapter layer or site; see muxc.ir.prefix")


PREFIX = AdapterKindSpec(
    kind=AdapterKind.PREFIX,
    peft_type="PREFIX_TUNING",
    peft_layers=(),
    config_problems=_problems,
    holds=lambda mod, adapter: False,
    records=_unused,
    traced_forward=_unused,
    trace_op=None,
    adapted_arg=0,
    input_arg=None,
    param_args=(0, 0),
    kernel_op="prefix_attention",
    apply=_unused,
    cost_op="attention",
    cost_dims=lambda k, n, r, pre: (),
    flops_per_token=lambda k, n, r, pre: 0.0,
    numel=lambda k, n, r, pre: 0,
    adds_to_output=False,
    traces=False,
)
