"""HF gradient checkpointing on a task's model: find it, and keep it out of the trace.

``model.gradient_checkpointing_enable()`` (``activation_checkpointing_enable`` in transformers
5) sets ``gradient_checkpointing = True`` on every module that has the attribute; each decoder
layer (``GradientCheckpointingLayer``) then runs under ``torch.utils.checkpoint`` in training
mode (every ``every_n_layers``-th layer only, when asked). torch.export does not keep that:
the non-reentrant form is traced through (the graph is the same as without checkpointing, so
the behaviour would be silently lost) and the reentrant form (``use_reentrant=True``) hides
each layer inside a no-grad region. muxc therefore traces with checkpointing switched off
(`checkpointing_off`, scoped to the trace) and honours it in its own runtime
(`muxc.ir.recompute`), per decoder layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from muxc.ir.recompute import layer_index

__all__ = ["checkpointed_layers", "checkpointing_off"]


def _flagged(hf: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(p, m) for p, m in hf.named_modules() if getattr(m, "gradient_checkpointing", False) is True]


def checkpointed_layers(hf: torch.nn.Module) -> frozenset[int] | None:
    """Decoder layers ``hf`` checkpoints in training: their indices, an empty set when
    checkpointing is off, or None when it is on for modules that are not single layers (an
    older model checkpointing its layer loop: every layer)."""
    flagged = _flagged(hf)
    if not flagged:
        return frozenset()
    layers = {layer_index(p) for p, _ in flagged}
    if None in layers and len(layers) == 1:
        return None  # only containers flagged: they checkpoint every layer they run
    return frozenset(x for x in layers if x is not None)


@contextlib.contextmanager
def checkpointing_off(hf: torch.nn.Module) -> Iterator[None]:
    """Switch ``hf``'s gradient checkpointing off inside the ``with`` block (per instance,
    restored on exit even if tracing fails)."""
    flagged = [m for _, m in _flagged(hf)]
    try:
        for m in flagged:
            m.gradient_checkpointing = False
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True
