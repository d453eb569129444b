"""The adapter-kind table: one `AdapterKindSpec` per PEFT method muxc runs.

>>> [k.value for k in KINDS], spec_of(AdapterKind.LORA).kernel_op
(['copy', 'bias', 'lora', 'ia3', 'dora', 'head', 'prefix', 'prompt', 'p_tuning'], 'multi_lora')
"""

from __future__ import annotations

import torch

from muxc.ir import AdapterKind
from muxc.kinds.bias import BIAS
from muxc.kinds.dora import DORA
from muxc.kinds.head import HEAD
from muxc.kinds.module_copy import MODULE_COPY
from muxc.kinds.ia3 import IA3
from muxc.kinds.lora import LORA
from muxc.kinds.prefix import PREFIX
from muxc.kinds.prompt import P_TUNING, PROMPT
from muxc.kinds.spec import AdapterKindSpec

__all__ = [
    "AdapterKindSpec",
    "KINDS",
    "SUPPORTED",
    "spec_of",
    "spec_for_config",
    "spec_for_layer",
    "spec_for_trace_op",
]

# table order is the order a site applies kinds: a task's trained bias first (it is part of
# the base output that LoRA adds to, IA3 scales and DoRA renormalises, subtracting it again)
# (a module copy replaces the task's segment outright: first)
KINDS: dict[AdapterKind, AdapterKindSpec] = {
    s.kind: s for s in (MODULE_COPY, BIAS, LORA, IA3, DORA, HEAD, PREFIX, PROMPT, P_TUNING)}
_BY_TRACE_OP = {s.trace_op: s for s in KINDS.values() if s.traces}

SUPPORTED = (
    "LoRA (Linear/Conv1D targets, bias='none'/'all'/'lora_only' on Linear/Conv1D/LayerNorm "
    "biases), DoRA (LoraConfig(use_dora=True), the same bias modes, Linear/Conv1D "
    "targets) and IA3 (Linear targets), with modules_to_save on the output head (a "
    "SEQ_CLS model's score/classifier, a causal LM's lm_head) or on nn.Linear/Conv1D/"
    "nn.LayerNorm modules of the backbone; prefix tuning (causal LM, with or without "
    "prefix_projection) on all tested families but Bloom and Falcon, with stages in one process"
    "; prompt tuning and P-tuning (MLP or LSTM encoder) on causal LMs"
)


def spec_of(kind: AdapterKind) -> AdapterKindSpec:
    return KINDS[kind]


def spec_for_config(cfg) -> AdapterKindSpec | None:
    """The kind a PEFT config trains (None: unsupported PEFT type)."""
    ptype = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    return next((s for s in KINDS.values() if s.peft_type == ptype and s.for_config(cfg)), None)


def spec_for_layer(layer: torch.nn.Module, adapter: str | None = None) -> AdapterKindSpec | None:
    """The kind whose PEFT layer class ``layer`` is exactly and, given ``adapter``, which holds
    it (kinds sharing a layer class, LoRA and DoRA, differ in what they hold); None:
    unsupported."""
    cls = type(layer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    found = [s for s in KINDS.values() if cls in s.peft_layers or name in s.peft_layers]
    if adapter is not None and len(found) > 1:
        found = [s for s in found if s.holds(layer, adapter)]
    return found[0] if found else None


def spec_for_trace_op(target) -> AdapterKindSpec | None:
    """The kind whose single-task trace op is ``target`` (None: not an adapter node)."""
    return _BY_TRACE_OP.get(target)
