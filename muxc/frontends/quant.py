"""Read a bitsandbytes-quantized base (QLoRA): find its quantized layers, check them, and route
them through muxc's frozen quantized ops (`muxc.ir.quant`) for the duration of a trace.

A layer is ``bitsandbytes.nn.Linear4bit`` (NF4/FP4, with or without double quantization) or
``Linear8bitLt`` (LLM.int8, int8 weights). While tracing, each one's quantization-state
tensors are registered as buffers of the layer under `muxc.ir.quant.STATE_ATTRS` names (so
torch.export lifts them as named frozen inputs) and its ``forward`` calls the opaque op; both
are removed on exit, even if tracing fails. `state_tensor` finds such a tensor again by name
(re-binding an export to another task's model).

>>> with routed_quantized("a", hf):                                  # doctest: +SKIP
...     ep = torch.export.export(...)   # one muxc::linear_4bit node per quantized layer
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator

import torch

from muxc.errors import ArchitectureMismatchError, UnsupportedPeftError
from muxc.frontends.peft import normalize_fqn
from muxc.ir.quant import linear_4bit, linear_8bit

__all__ = ["quantized_layers", "is_quantized", "quantization", "check_quantized",
           "check_same_quantization", "routed_quantized",
           "state_tensors", "state_tensor", "quant_config"]

_FLOAT_INPUTS = (torch.float32, torch.bfloat16)  # inputs Linear4bit computes in as they are


def _kinds() -> tuple[type, ...]:
    """bitsandbytes' quantized linear classes, if it is loaded. A quantized model was loaded
    through it, so a process without it has none; muxc never imports it first (importing it
    costs time and logs warnings on some CPUs)."""
    if "bitsandbytes" not in sys.modules:
        return ()
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    return (Linear4bit, Linear8bitLt)


def quantized_layers(hf: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> every bitsandbytes quantized linear layer of ``hf``."""
    kinds = _kinds()
    if not kinds:
        return {}
    return {p: m for p, m in hf.named_modules() if isinstance(m, kinds)}


def is_quantized(mod) -> bool:
    """Is ``mod`` a bitsandbytes quantized linear layer muxc routes?"""
    kinds = _kinds()
    return bool(kinds) and isinstance(mod, kinds)


def _is_4bit(mod) -> bool:
    kinds = _kinds()
    return bool(kinds) and isinstance(mod, kinds[0])


def _scb(mod) -> torch.Tensor | None:
    """An 8-bit layer's row scales: in its state after the first forward, else on its weight."""
    scb = mod.state.SCB
    return scb if scb is not None else getattr(mod.weight, "SCB", None)


def state_tensors(mod) -> dict[str, torch.Tensor]:
    """The quantization-state tensors of one layer by `STATE_ATTRS` name (present ones only)."""
    if _is_4bit(mod):
        qs = mod.weight.quant_state
        out = {"quant_absmax": qs.absmax}
        if qs.nested:
            out.update(quant_nested_absmax=qs.state2.absmax, quant_nested_code=qs.state2.code,
                       quant_offset=qs.offset)
        return out
    return {"quant_scb": _scb(mod)}


def state_tensor(mod, attr: str) -> torch.Tensor | None:
    """The tensor a lifted ``<layer path>.<attr>`` names in ``mod`` now (None: not one)."""
    return state_tensors(mod).get(attr) if is_quantized(mod) else None


def quant_config(mod) -> tuple:
    """What of a layer's quantization a traced graph depends on: its config (baked into the
    op) and its state tensors' metadata (lifted as inputs)."""
    tensors = tuple((k, tuple(t.shape), str(t.dtype), str(t.device))
                    for k, t in state_tensors(mod).items() if t is not None)
    if _is_4bit(mod):
        qs = mod.weight.quant_state
        nested = (qs.state2.blocksize, str(qs.state2.dtype)) if qs.nested else None
        return ("4bit", qs.quant_type, qs.blocksize, tuple(qs.shape), str(qs.dtype), nested,
                str(mod.compute_dtype), mod.compute_type_is_set, tensors)
    return ("8bit", float(mod.state.threshold), mod.state.has_fp16_weights, tensors)


def quantization(hf: torch.nn.Module) -> dict[str, str]:
    """Layer path (PEFT wrappers removed) -> how it is quantized, e.g. ``"nf4 (block 64)"``."""
    out = {}
    for path, mod in quantized_layers(hf).items():
        if _is_4bit(mod):
            qs = mod.weight.quant_state
            nested = f", double quantization (block {qs.state2.blocksize})" if qs.nested else ""
            text = f"{qs.quant_type} (block {qs.blocksize}{nested})"
        else:
            text = f"int8 (threshold {float(mod.state.threshold)})"
        out[normalize_fqn(path)] = text
    return out


def check_same_quantization(named_models) -> None:
    """Raise `ArchitectureMismatchError` unless every ``(task name, HF model)`` has its base
    quantized the same way (before any tracing: a mismatch would otherwise surface only
    after every task is exported)."""
    first_name, first = None, None
    for name, hf in named_models:
        mine = quantization(hf)
        if first is None:
            first_name, first = name, mine
            continue
        for path in [*first, *(p for p in mine if p not in first)]:  # in module order
            a, b = first.get(path, "not quantized"), mine.get(path, "not quantized")
            if a != b:
                raise ArchitectureMismatchError(
                    f"tasks {first_name!r} and {name!r} have differently quantized bases: layer "
                    f"{path!r} is {a} vs {b}; load every task's base with the same "
                    "BitsAndBytesConfig (or none)"
                )


def check_quantized(task_name: str, hf: torch.nn.Module) -> None:
    """Raise `UnsupportedPeftError` for a quantized layer muxc cannot run as a frozen op."""
    for path, mod in quantized_layers(hf).items():
        where = f"task {task_name!r}: quantized layer {path!r} ({type(mod).__name__})"
        if _is_4bit(mod):
            qs = getattr(mod.weight, "quant_state", None)
            if qs is None:
                raise UnsupportedPeftError(
                    f"{where} has no quantization state (weights not quantized yet); load the "
                    "model with from_pretrained(..., quantization_config=BitsAndBytesConfig(...))"
                )
            if getattr(qs, "packing_format_for_cpu", False):
                raise UnsupportedPeftError(
                    f"{where} holds weights repacked for CPU inference (bitsandbytes does this on "
                    "an eval-mode forward without grad); reload the model and compile it before "
                    "running it in eval mode"
                )
            if qs.nested and qs.state2.blocksize != 256:
                raise UnsupportedPeftError(
                    f"{where}: double quantization with block size {qs.state2.blocksize} "
                    "(bitsandbytes' matmul_4bit supports 256 only)"
                )
        else:
            if mod.state.has_fp16_weights or mod.weight.dtype != torch.int8:
                raise UnsupportedPeftError(
                    f"{where} keeps fp16 weights (has_fp16_weights=True), which bitsandbytes "
                    "re-quantizes every step; load with BitsAndBytesConfig(load_in_8bit=True, "
                    "llm_int8_has_fp16_weight=False)"
                )
            if _scb(mod) is None:
                raise UnsupportedPeftError(f"{where} has no row scales (SCB); load it quantized")


def _forward_4bit(mod) -> Callable:
    """``Linear4bit.forward`` in training mode, its matmul as one `linear_4bit` op; mutates
    nothing (bitsandbytes picks the compute dtype from the first input: so does this).

    The quantization config is read now, from the real weight: while exporting, parameters
    are fake tensors without bitsandbytes' attributes."""
    qs = mod.weight.quant_state
    nested = bool(qs.nested)
    config = (list(qs.shape), int(qs.blocksize), str(qs.quant_type),
              int(qs.state2.blocksize) if nested else 0, qs.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if dtype is None or (not self.compute_type_is_set and x.dtype in _FLOAT_INPUTS):
            dtype = x.dtype
        state = (self.quant_nested_absmax, self.quant_nested_code, self.quant_offset) if nested \
            else (None, None, None)
        return linear_4bit(x, self.weight, self.bias, self.quant_absmax, *state, *config, dtype)

    return forward


def _forward_8bit(mod) -> Callable:
    """``Linear8bitLt.forward`` in training mode as one `linear_8bit` op; mutates nothing."""
    threshold = float(mod.state.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_8bit(x, self.weight, self.bias, self.quant_scb, threshold)

    return forward


@contextlib.contextmanager
def routed_quantized(task_name: str, hf: torch.nn.Module) -> Iterator[None]:
    """Route every quantized layer of ``hf`` through muxc's frozen quantized ops, only inside
    the ``with`` block (module doc). Patches are per instance and removed on exit."""
    check_quantized(task_name, hf)
    done = []
    try:
        for mod in quantized_layers(hf).values():
            names = []
            done.append((mod, names))
            for attr, t in state_tensors(mod).items():
                if hasattr(mod, attr):
                    raise UnsupportedPeftError(
                        f"task {task_name!r}: quantized layer {type(mod).__name__} already has an "
                        f"attribute {attr!r} (muxc lifts its quantization state under that name)"
                    )
                mod.register_buffer(attr, t, persistent=False)
                names.append(attr)
            fwd = _forward_4bit(mod) if _is_4bit(mod) else _forward_8bit(mod)
            mod.forward = types.MethodType(fwd, mod)
        yield
    finally:
        for mod, names in done:
            mod.__dict__.pop("forward", None)
            for attr in names:
                del mod._buffers[attr]
