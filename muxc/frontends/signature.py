"""`TraceSignature`: everything that decides what torch.export makes of a task, as one key.

Two tasks with equal signatures export to the same graph up to which tensors its placeholders
bind (and, for adapters of one model, which adapter parameters each adapter node reads), so
one export can serve both (`muxc.frontends.cache`). The signature holds:

- the HF model class and every field of its config (attention implementation included);
- every parameter and buffer in export order: FQN, shape, stride, dtype, device,
  ``requires_grad`` and tensor type (a quantised weight is another type);
- every module: its path, class, plain attributes (flags, sizes, PEFT's per-adapter scaling
  and dropout, the active adapter) and the functions it calls through hooks or a patched
  ``forward``; the training flag is left out because `trace_task` always traces in training
  mode;
- the task's adapter in unified form, without its name: per site, the kind, rank, scaling,
  dropout and each parameter's shape and dtype (so tasks differing in rank, alpha or targets
  never share);
- whether the graph takes ``position_ids``.

Anything else a module holds (an object that is not a plain value) counts by its class. The
key errs on the side of tracing again: equal signatures must mean equal graphs, unequal
signatures only cost an export.

>>> trace_signature(task_a, False) == trace_signature(task_b, False)   # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

import torch

from muxc.frontends.peft import adapter_name_of, adapter_records, hf_model
from muxc.task import Task

__all__ = ["TraceSignature", "trace_signature"]

# module state that is not a plain attribute: tensors and submodules are listed on their own;
# `training` is overridden by the trace
_SKIPPED_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "training"})


@dataclass(frozen=True)
class TraceSignature:
    """The structural key of one task's export (module doc); hashable, compared exactly."""

    model: str
    config: tuple
    with_positions: bool
    tensors: tuple
    modules: tuple
    adapters: tuple

    def __repr__(self) -> str:
        return (
            f"TraceSignature({self.model}, {len(self.tensors)} tensors, {len(self.modules)} "
            f"modules, {len(self.adapters)} adapters, with_positions={self.with_positions})"
        )


def trace_signature(task: Task, with_positions: bool) -> TraceSignature:
    """The `TraceSignature` of ``task`` traced with or without ``position_ids``; reads only."""
    hf = hf_model(task.name, task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    records = adapter_records(task.name, hf, adapter)
    return TraceSignature(
        model=_callable_name(type(hf)),
        config=_plain(vars(hf.config)),
        with_positions=with_positions,
        tensors=tuple(_tensor_key(n, t) for n, t in _tensors(hf)),
        modules=tuple(_module_key(path, mod) for path, mod in hf.named_modules(remove_duplicate=False)),
        adapters=tuple(
            (
                r.site,
                r.kind.value,
                r.rank,
                r.scaling,
                r.dropout,
                tuple((role, tuple(t.shape), str(t.dtype)) for role, t in r.params.items()),
            )
            for r in records
        ),
    )


def _tensors(hf: torch.nn.Module):
    yield from hf.named_parameters(remove_duplicate=False)
    yield from hf.named_buffers(remove_duplicate=False)


def _tensor_key(name: str, t: torch.Tensor) -> tuple:
    return (
        name,
        tuple(t.shape),
        tuple(t.stride()),
        str(t.dtype),
        str(t.device),
        t.requires_grad,
        _callable_name(type(t)),
    )


def _module_key(path: str, mod: torch.nn.Module) -> tuple:
    attrs = []
    for k, v in sorted(vars(mod).items()):
        if k in _SKIPPED_ATTRS:
            continue
        if "hooks" in k and isinstance(v, dict):  # keyed by global handle ids: keep the order
            v = list(v.values())
        attrs.append((k, _plain(v)))
    return (path, _callable_name(type(mod)), tuple(attrs))


def _plain(v, depth: int = 0):
    """A comparable stand-in for ``v``: plain values as they are, containers element-wise,
    tensors by their metadata, functions by name, any other object by its class."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Enum):
        return f"{type(v).__qualname__}.{v.name}"
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype), str(v.device))
    if depth > 8:  # deep nesting is never graph-shaping state; keep it cheap
        return _callable_name(type(v))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_plain(x, depth + 1) for x in v))
    if isinstance(v, dict):
        items = sorted(((repr(k), _plain(x, depth + 1)) for k, x in v.items()), key=lambda kv: kv[0])
        return ("dict", tuple(items))
    if isinstance(v, (set, frozenset)):
        return ("set", tuple(sorted(repr(_plain(x, depth + 1)) for x in v)))
    if isinstance(v, torch.nn.Module):
        return ("module", _callable_name(type(v)))  # listed on its own by named_modules
    if hasattr(v, "to_dict") and hasattr(v, "__dict__"):  # a (sub-)config
        return (_callable_name(type(v)), _plain(vars(v), depth + 1))
    if isinstance(v, functools.partial):
        return ("partial", _callable_name(v.func), _plain((v.args, v.keywords), depth + 1))
    if callable(v):
        return ("callable", _callable_name(v))
    return ("object", _callable_name(type(v)))


def _callable_name(f) -> str:
    inner = getattr(f, "__func__", None)  # a bound method: its function
    if inner is not None and inner is not f:
        return _callable_name(inner)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
