"""The adapter-kind table: one `AdapterKindSpec` per PEFT method muxc runs.

>>> [k.value for k in KINDS], spec_of(AdapterKind.LORA).kernel_op
(['lora', 'ia3'], 'multi_lora')
"""

from __future__ import annotations

import torch

from muxc.ir import AdapterKind
from muxc.kinds.ia3 import IA3
from muxc.kinds.lora import LORA
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["AdapterKindSpec", "KINDS", "SUPPORTED", "spec_of", "spec_for_layer", "spec_for_trace_op"]

KINDS: dict[AdapterKind, AdapterKindSpec] = {s.kind: s for s in (LORA, IA3)}
_BY_TRACE_OP = {s.trace_op: s for s in KINDS.values()}

SUPPORTED = "LoRA (Linear/Conv1D targets, bias='none', no DoRA) and IA3 (Linear targets)"


def spec_of(kind: AdapterKind) -> AdapterKindSpec:
    return KINDS[kind]


def spec_for_layer(layer: torch.nn.Module) -> AdapterKindSpec | None:
    """The kind whose PEFT layer class ``layer`` is exactly (None: unsupported)."""
    return next((s for s in KINDS.values() if type(layer) in s.peft_layers), None)


def spec_for_trace_op(target) -> AdapterKindSpec | None:
    """The kind whose single-task trace op is ``target`` (None: not an adapter node)."""
    return _BY_TRACE_OP.get(target)
