"""Declarative kernel dispatch: op kind -> implementations, each with a checker.

An implementation registers ``fn`` (the launcher) and ``check(*tensors) -> str | None``: None
when it can run on these inputs, else the reason it cannot. `select` picks the first usable
implementation in preference order (Triton on CUDA, the grouped torch path otherwise; the
per-task torch reference only when forced) and returns the reason for the choice, which
`Program.explain()` shows. Checkers look only at the probe tensor's dtype and device, so a
choice is made once per (op, request, dtype, device) and cached: per-call dispatch is a dict
lookup, and the compile-time choice (`select_kernels`) is the one every call uses.

>>> from muxc.kernels import registry
>>> choice = registry.select("multi_lora", None, torch.empty(2, 2))
>>> choice.impl, choice.reason
(<Impl.GROUPED: 'grouped'>, 'tensors are on cpu; triton is used on cuda only (force impl="triton" to run the interpreter)')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from muxc.errors import KernelUnavailableError, OptionsError

__all__ = ["Impl", "KernelImpl", "Choice", "register", "select", "implementations"]


class Impl(str, Enum):
    """Kernel implementation families.

    ``TRITON``: one launch per kernel kind for all tasks (CUDA; CPU through the interpreter).
    ``GROUPED``: torch ops over groups of adjacent tasks, no per-task loop where grouping pays
    (`muxc.kernels.grouped`); the CPU default. ``TORCH``: the per-task reference loop.
    """

    TRITON = "triton"
    GROUPED = "grouped"
    TORCH = "torch"

    @staticmethod
    def parse(value: Impl | str | None) -> Impl | None:
        if value is None or isinstance(value, Impl):
            return value
        try:
            return Impl(value)
        except ValueError:
            raise OptionsError(
                f"unknown kernel impl {value!r}; choose one of {[i.value for i in Impl]} or None"
            ) from None


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of an op kind."""

    op: str
    impl: Impl
    fn: Callable
    check: Callable[..., str | None]
    """Returns None when ``fn`` can run on the given tensors, else why not."""


@dataclass(frozen=True)
class Choice:
    """The implementation picked for a call and why."""

    impl: Impl
    fn: Callable
    reason: str


_REGISTRY: dict[str, dict[Impl, KernelImpl]] = {}
_PREFERENCE = (Impl.TRITON, Impl.GROUPED, Impl.TORCH)
_CHOICES: dict[tuple, Choice] = {}
"""Memoised `select` results: (op, forced impl, dtype, device) -> Choice."""


def always(*tensors, forced: bool) -> str | None:
    """The checker of an implementation that runs on any device and dtype (the references)."""
    return None


def register(op: str, impl: Impl, fn: Callable, check: Callable[..., str | None]) -> None:
    """Register ``fn`` as implementation ``impl`` of ``op`` (done once, at import)."""
    _REGISTRY.setdefault(op, {})[impl] = KernelImpl(op=op, impl=impl, fn=fn, check=check)
    _CHOICES.clear()


def implementations(op: str) -> dict[Impl, KernelImpl]:
    """The registered implementations of ``op``."""
    if op not in _REGISTRY:
        raise OptionsError(f"unknown kernel op {op!r}; known: {sorted(_REGISTRY)}")
    return dict(_REGISTRY[op])


def select(op: str, impl: Impl | str | None, *tensors: torch.Tensor) -> Choice:
    """Pick the implementation of ``op`` for ``tensors``.

    ``impl=None`` chooses automatically; a forced ``impl`` raises `KernelUnavailableError`
    with the checker's reason when it cannot run. Checkers read only the first tensor's dtype
    and device, so the answer is cached under them: the checkers run once per combination.
    """
    forced = Impl.parse(impl)
    probe = tensors[0]
    key = (op, forced, probe.dtype, probe.device)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _select(op, forced, *tensors)
    return hit


def _select(op: str, forced: Impl | None, *tensors: torch.Tensor) -> Choice:
    impls = implementations(op)
    if forced is not None:
        if forced not in impls:
            raise KernelUnavailableError(
                f"{op}: implementation {forced.value!r} is not registered "
                f"(registered: {[i.value for i in impls]}); is triton installed?"
            )
        why_not = impls[forced].check(*tensors, forced=True)
        if why_not is not None:
            raise KernelUnavailableError(
                f"{op}: impl={forced.value!r} cannot run: {why_not}; "
                "use impl=None to fall back to the torch reference"
            )
        return Choice(forced, impls[forced].fn, "forced by caller")
    reasons = []
    for cand in _PREFERENCE:
        if cand not in impls:
            reasons.append(f"{cand.value} not registered")
            continue
        why_not = impls[cand].check(*tensors, forced=False)
        if why_not is None:
            reason = "; ".join(reasons) if reasons else f"{cand.value} is preferred here"
            return Choice(cand, impls[cand].fn, reason)
        reasons.append(why_not)
    raise KernelUnavailableError(f"{op}: no implementation can run: {'; '.join(reasons)}")
