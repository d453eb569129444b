"""Pass `share_frozen_weights`: keep ONE copy of the frozen base across all tasks.

Frozen tensors are matched across tasks by normalised name. The first task's tensor is the
shared copy. Another task's tensor is accepted when it is the same object (tasks built on one
base model) or has equal shape, dtype and values (separate copies of one checkpoint); then its
parameter is re-pointed at the shared storage (``param.data = shared``) so the duplicate's
memory is freed once nothing else references it. The user's models keep computing exactly the
same values. Anything else raises `BaseWeightMismatchError` naming the tensor and the tasks.
A base tensor a task trains (a bias, `muxc.kinds.bias`) is replaced by a frozen snapshot
(`_snapshots`): it is neither shared, compared nor re-pointed.
A quantized base (bitsandbytes, `muxc.ir.quant`) is shared the same way: its packed weights
and each layer's quantization-state tensors are frozen tensors like any other, compared by
value and re-pointed; its non-tensor state (quant type, block size) is part of each traced op,
which `merge_backbones` requires to be equal.

Returns new TaskGraphs (same graph modules) whose frozen bindings all point at the shared
tensors, and a `SharingReport`. Does not mutate the input TaskGraphs; mutates, for value
duplicates only, the ``.data`` of the users' frozen parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from muxc.errors import ArchitectureMismatchError, BaseWeightMismatchError
from muxc.ir import Binding, BindingKind, TaskGraph
from muxc.ir.quant import is_quant_state
from muxc.kinds import spec_of
from muxc.passes.pass_base import CompileContext, PassResult

__all__ = ["share_frozen_weights", "SharingReport"]


class SharingReport(dict):
    """fqn -> how it was shared: "identity" or "value" (``program.sharing``)."""

    def __repr__(self) -> str:
        by_value = sum(1 for how in self.values() if how == "value")
        n = len(self)
        return f"SharingReport({n} frozen tensors: {n - by_value} by identity, {by_value} by value)"


def share_frozen_weights(
    graphs: Sequence[TaskGraph], ctx: CompileContext
) -> PassResult[tuple[tuple[TaskGraph, ...], SharingReport]]:
    """New TaskGraphs bound to the first task's frozen tensors; does not mutate ``graphs``.

    Also returns how each tensor was shared. Re-points value duplicates' ``.data`` (module doc).
    """
    first = graphs[0]
    snap = _snapshots(graphs)
    shared = {b.fqn: b.tensor for b in snap(first).values()}
    report = SharingReport({fqn: "identity" for fqn in shared})
    aliases, rebound = [], []
    for ph, b in snap(first).items():
        if b.tensor is not first.bindings[ph].tensor:
            rebound.append((0, ph, b))
    for i, g in enumerate(graphs[1:], start=1):
        mine = snap(g)
        names = {b.fqn for b in mine.values()}
        # a task with its own head stops at the hidden state: it lacks the frozen LM head
        # (merge_backbones checks its backbone is a prefix of the others')
        headed = g.head is not None or any(h.head is not None for h in graphs[:i])
        if names != set(shared) and not headed:
            missing = sorted(set(shared) - names)[:3]
            extra = sorted(names - set(shared))[:3]
            raise ArchitectureMismatchError(
                f"tasks {first.task!r} ({first.model_type}) and {g.task!r} ({g.model_type}) have "
                f"different frozen weights: only in {first.task!r}: {missing}, only in "
                f"{g.task!r}: {extra}; all tasks must fine-tune the same base architecture"
            )
        for ph, b in mine.items():
            if b.fqn not in shared:
                shared[b.fqn] = b.tensor
                report[b.fqn] = "identity"
            ref = shared[b.fqn]
            if b.tensor is not ref and not _same_storage(b.tensor, ref):
                _check_equal(first.task, g.task, b.fqn, ref, b.tensor)
                if _repointable(b):
                    aliases.append((b.tensor, ref))
                report[b.fqn] = "value"
            rebound.append((i, ph, Binding(b.kind, b.fqn, ref)))
    # only once every task is checked: a failed compile leaves the user's models untouched
    bindings = [dict(g.bindings) for g in graphs]
    for i, ph, binding in rebound:
        bindings[i][ph] = binding
    for param, ref in aliases:
        param.data = ref.data
    shared_graphs = tuple(replace(g, bindings=b) for g, b in zip(graphs, bindings))
    return PassResult((shared_graphs, report))


def _snapshots(graphs: Sequence[TaskGraph]):
    """``snap(g)``: ``g``'s frozen bindings with each base tensor a task TRAINS (a bias,
    `muxc.kinds.bias`) replaced by the frozen op's snapshot of it: another task's untrained
    tensor of that name if there is one, else a detached copy. A trained tensor is never the
    shared copy, never compared (training changes it) and never re-pointed."""
    trained = {id(p) for g in graphs for r in g.adapters if spec_of(r.kind).trains_base
               for p in r.params.values()}
    if not trained:
        return TaskGraph.frozen_bindings
    untrained: dict[str, torch.Tensor] = {}
    for g in graphs:
        for b in g.frozen_bindings().values():
            if id(b.tensor) not in trained:
                untrained.setdefault(b.fqn, b.tensor)
    copies: dict[str, torch.Tensor] = {}

    def snap(g: TaskGraph) -> dict[str, Binding]:
        out = {}
        for ph, b in g.frozen_bindings().items():
            if id(b.tensor) in trained:
                if b.fqn not in untrained and b.fqn not in copies:
                    copies[b.fqn] = b.tensor.detach().clone()
                b = Binding(b.kind, b.fqn, untrained.get(b.fqn, copies.get(b.fqn)))
            out[ph] = b
        return out

    return snap


def _repointable(b: Binding) -> bool:
    """May a value duplicate be re-pointed at the shared tensor? Frozen parameters, and the
    quantization state of a quantized base (bitsandbytes keeps it on the weight, beside it)."""
    if b.kind is BindingKind.PARAMETER:
        return isinstance(b.tensor, torch.nn.Parameter)
    return b.kind is BindingKind.BUFFER and is_quant_state(b.fqn)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` views exactly ``b``'s memory (e.g. already shared by an earlier compile)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _check_equal(task_a: str, task_b: str, fqn: str, a: torch.Tensor, b: torch.Tensor) -> None:
    where = f"frozen tensor {fqn!r} differs between tasks {task_a!r} and {task_b!r}"
    remedy = "all tasks must use the same base checkpoint (load every task's base from one source)"
    if a.shape != b.shape or a.dtype != b.dtype:
        raise BaseWeightMismatchError(
            f"{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}; {remedy}"
        )
    if a.device != b.device:
        raise BaseWeightMismatchError(f"{where}: on {a.device} vs {b.device}; move both models to one device")
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs().max().item()
        raise BaseWeightMismatchError(f"{where}: max abs difference {diff:.3g}; {remedy}")
