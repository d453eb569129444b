"""`TraceSignature`: everything that decides what torch.export makes of a task, as one key.

Two tasks with equal signatures export to the same graph up to which tensors its placeholders
bind (and, for adapters of one model, which adapter parameters each adapter node reads), so
one export can serve both (`muxc.frontends.cache`). The signature holds:

- the HF model class and every field of its config (attention implementation included);
- every parameter and buffer in export order: FQN, shape, stride, dtype, device,
  ``requires_grad`` (not for adapter parameters: adapters are opaque nodes whatever it is, and
  compiling turns it on for every adapter of a model) and tensor type (a quantised weight is
  another type);
- every module: its path, class, plain attributes (flags, sizes, PEFT's per-adapter scaling
  and dropout, the active adapter; for a bitsandbytes-quantized layer its quantization config
  and state tensors' metadata) and the functions it calls through hooks or a patched
  ``forward``; the training flag is left out because `trace_task` always traces in training
  mode;
- the task's adapter in unified form, without its name: per site, the kind, rank, scaling,
  dropout and each parameter's shape and dtype (so tasks differing in rank, alpha or targets
  never share);
- whether the graph takes ``position_ids``;
- the code the trace runs, by identity: the HF model's class and, for every module class, the
  class and its ``forward`` function (a class patched or defined anew, e.g. in a test, is another
  key even under the same qualified name), and the functions HF's attention and mask registries
  name (``transformers`` ``ALL_ATTENTION_FUNCTIONS``/``ALL_MASK_ATTENTION_FUNCTIONS``: registering
  another function under ``"sdpa"`` changes the trace);
- the process state a trace reads: the default dtype, grad mode and autocast state.

Other objects a module holds count by class and attributes, functions by qualified name, code
object and captured values (two closures of one ``def`` capturing other values differ). The
key errs on the side of tracing again: equal signatures must mean equal graphs, unequal
signatures only cost an export.

A signature keeps its large parts (config, tensors, modules, adapter) as a 256-bit digest of
their canonical encoding, not the tuples themselves (~1.8 MiB each for a 12-layer Llama, and
the template store keeps one per structure); code objects in them stay, compared by value.

The key is complete across compiles in one process, so the process-wide template store
(`muxc.frontends.cache.SharedTemplates`) keys on it too. It covers every input `export_task`
reads (the task's model and adapter, ``with_positions``; compile options reach the trace only
through ``with_positions``: alignment and prefix tasks; the attention rewrites, recompute and
the rest act on the merged graph after tracing). Versions of torch, transformers and PEFT are
left out (one process imports one of each). Not covered: a library *function* (not a module's
``forward``, not a registered attention function) patched between two compiles; call
`muxc.frontends.cache.clear_shared_templates` after patching one.

>>> trace_signature(task_a, False) == trace_signature(task_b, False)   # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import types
from dataclasses import dataclass
from enum import Enum

import torch

from muxc.frontends.peft import (
    adapter_name_of,
    adapter_param_ids,
    adapter_records,
    bias_mode,
    hf_model,
)
from muxc.frontends.quant import is_quantized, quant_config
from muxc.task import Task

__all__ = ["TraceSignature", "trace_signature"]

# module state that is not a plain attribute: tensors and submodules are listed on their own;
# `training` is overridden by the trace
_SKIPPED_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "training"})


@dataclass(frozen=True)
class TraceSignature:
    """The structural key of one task's export (module doc); hashable, compared exactly.

    The config, tensors, modules and adapter parts are large (~1.8 MiB of tuples for a 12-layer
    Llama) and a signature is kept with every template, so they are held as a digest
    (`_Digest`: BLAKE2b-256 of their canonical encoding, code objects aside and compared by
    value); the model class, code and process parts are small and held as they are.
    """

    model: str
    with_positions: bool
    digest: bytes
    codes: tuple  # code objects of the digested parts, in order (compared by value)
    sizes: tuple  # (tensors, modules, adapters) counted
    code: tuple = ()
    process: tuple = ()

    def __repr__(self) -> str:
        tensors, modules, adapters = self.sizes
        return (
            f"TraceSignature({self.model}, {tensors} tensors, {modules} "
            f"modules, {adapters} adapters, with_positions={self.with_positions})"
        )


class _Digest:
    """BLAKE2b-256 of a nested plain value (tuples of None, bool, int, float, str, bytes and code
    objects: what `_Plain` and the keys below make), each element tagged with its class and
    length, so two values digest alike only if they are equal element for element (stricter than
    ``==``: ``1``, ``1.0`` and ``True`` differ, which at worst traces a task again). Code objects
    are collected in ``codes`` and stand in the digest by their position; the signature compares
    them by value."""

    _LEAVES = (type(None), bool, int, float, str, bytes)

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=32)
        self.codes: list[types.CodeType] = []

    def add(self, v) -> _Digest:
        h = self._hash
        if isinstance(v, tuple):
            h.update(b"(%d;" % len(v))
            for x in v:
                self.add(x)
            h.update(b")")
        elif isinstance(v, types.CodeType):
            h.update(b"c%d;" % len(self.codes))
            self.codes.append(v)
        else:  # a leaf; anything else (not made by the keys here) by class and repr, which at
            # worst differs between equal values (an address in it): then a task is traced again
            text = repr(v).encode()
            leaf = isinstance(v, self._LEAVES)
            name = type(v).__qualname__ if leaf else "?" + _callable_name(type(v))
            h.update(b"%s:%d;" % (name.encode(), len(text)))
            h.update(text)
        return self

    def bytes(self) -> bytes:
        return self._hash.digest()


def trace_signature(task: Task, with_positions: bool) -> TraceSignature:
    """The `TraceSignature` of ``task`` traced with or without ``position_ids``; reads only."""
    hf = hf_model(task.name, task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    records = adapter_records(task.name, hf, adapter, bias_mode(task.model, adapter), model=task.model)
    plain = _Plain()
    adapters = adapter_param_ids(task.model)
    tensors = tuple(_tensor_key(n, t, id(t) in adapters) for n, t in _tensors(hf))
    modules = tuple(
        _module_key(path, mod, plain) for path, mod in hf.named_modules(remove_duplicate=False)
    )
    adapter_keys = tuple(
        (
            r.site,
            r.kind.value,
            r.rank,
            r.scaling,
            r.dropout,
            tuple((role, tuple(t.shape), str(t.dtype)) for role, t in r.params.items()),
        )
        for r in records
    )
    digest = _Digest().add((plain(hf.config), tensors, modules, adapter_keys))
    return TraceSignature(
        model=_callable_name(type(hf)),
        with_positions=with_positions,
        digest=digest.bytes(),
        codes=tuple(digest.codes),
        sizes=(len(tensors), len(modules), len(adapter_keys)),
        code=_code_key(hf),
        process=_process_key(),
    )


def _code_key(hf: torch.nn.Module) -> tuple:
    """The code a trace of ``hf`` runs, by identity (module doc)."""
    classes = dict.fromkeys(type(m) for m in hf.modules())
    return (
        tuple((cls, getattr(cls, "forward", None)) for cls in classes),
        _registry("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
        _registry("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    )


def _registry(module: str, name: str) -> tuple:
    """``(key, function)`` of one of HF's function registries, sorted by key; () without it."""
    try:
        mapping = getattr(importlib.import_module(module), name)
        return tuple(sorted(mapping.items(), key=lambda kv: str(kv[0])))
    except (ImportError, AttributeError):  # pragma: no cover - another transformers layout
        return ()


def _process_key() -> tuple:
    """Process state a trace reads: default dtype, grad mode, autocast (CPU and CUDA)."""
    return (
        str(torch.get_default_dtype()),
        torch.is_grad_enabled(),
        torch.is_autocast_enabled("cpu"),
        str(torch.get_autocast_dtype("cpu")),
        torch.is_autocast_enabled("cuda"),
        str(torch.get_autocast_dtype("cuda")),
    )


def _tensors(hf: torch.nn.Module):
    yield from hf.named_parameters(remove_duplicate=False)
    yield from hf.named_buffers(remove_duplicate=False)


def _tensor_key(name: str, t: torch.Tensor, adapter: bool) -> tuple:
    return (
        name,
        tuple(t.shape),
        tuple(t.stride()),
        str(t.dtype),
        str(t.device),
        None if adapter else t.requires_grad,
        _callable_name(type(t)),
    )


def _module_key(path: str, mod: torch.nn.Module, plain: _Plain) -> tuple:
    attrs = []
    for k, v in sorted(vars(mod).items()):
        if k in _SKIPPED_ATTRS:
            continue
        if "hooks" in k and isinstance(v, dict):  # keyed by global handle ids: keep the order
            v = list(v.values())
        attrs.append((k, plain(v)))
    if is_quantized(mod):  # baked into the traced op; kept on the weight, not the module
        attrs.append(("<quantization>", quant_config(mod)))
    return (path, _callable_name(type(mod)), tuple(attrs))


class _Plain:
    """A comparable stand-in for a value: plain values as they are, containers element-wise,
    tensors by their metadata, functions by qualified name, modules by class (each module is
    listed on its own), other objects by class and attributes (each object once: a config held
    by every layer costs one walk), objects without attributes by class."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[object, object]] = {}  # id -> (object kept alive, stand-in)
        self._open: set[int] = set()  # objects being walked (a reference cycle ends here)

    def __call__(self, v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Enum):
            return f"{_callable_name(type(v))}.{v.name}"
        if isinstance(v, (torch.dtype, torch.device)):
            return str(v)
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), str(v.dtype), str(v.device))
        if isinstance(v, torch.nn.Module):
            return ("module", _callable_name(type(v)))
        if isinstance(v, functools.partial):
            return ("partial", _callable_name(v.func), self((v.args, v.keywords)))
        if isinstance(v, types.MethodType):
            return ("method", self(v.__func__))
        if isinstance(v, types.FunctionType):
            return self._function(v)
        if isinstance(v, type) or (callable(v) and not hasattr(v, "__dict__")):
            return ("callable", _callable_name(v))
        key = id(v)
        if key in self._done:
            return self._done[key][1]
        if key in self._open:
            return ("cycle", _callable_name(type(v)))
        self._open.add(key)
        try:
            out = self._walk(v)
        finally:
            self._open.discard(key)
        self._done[key] = (v, out)
        return out

    def _function(self, f: types.FunctionType):
        """A function by name, code object (compared by value: one ``def`` is one code) and
        what it captured (closure cells, defaults): two closures of one ``def`` capturing other
        values are other functions."""
        key = id(f)
        if key in self._done:
            return self._done[key][1]
        self._done[key] = (f, ("cycle", _callable_name(f)))  # a closure reaching itself
        cells = tuple(self(c.cell_contents) if _filled(c) else "<empty>" for c in f.__closure__ or ())
        out = ("function", _callable_name(f), f.__code__, cells, self(f.__defaults__),
               self(f.__kwdefaults__))
        self._done[key] = (f, out)
        return out

    def _walk(self, v):
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(self(x) for x in v))
        if isinstance(v, dict):
            items = ((repr(k), self(x)) for k, x in v.items())
            return ("dict", tuple(sorted(items, key=lambda kv: kv[0])))
        if isinstance(v, (set, frozenset)):
            return ("set", tuple(sorted(repr(self(x)) for x in v)))
        if hasattr(v, "__dict__"):
            return (_callable_name(type(v)), self(vars(v)))
        return ("object", _callable_name(type(v)))


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return False
    return True


def _callable_name(f) -> str:
    inner = getattr(f, "__func__", None)  # a bound method: its function
    if inner is not None and inner is not f:
        return _callable_name(inner)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
