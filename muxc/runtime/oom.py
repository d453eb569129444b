"""Out-of-memory during a step: recognise it, and put the adapter gradients back as they were.

`is_out_of_memory` is the one test for "an allocation failed": `torch.OutOfMemoryError` (CUDA,
and other accelerators that raise it) or a `RuntimeError` whose message says the allocator could
not get memory (CPU: ``DefaultCPUAllocator: not enough memory: you tried to allocate ...``).

`GradRollback` records, before an attempt at a step, what each adapter ``.grad`` holds (a copy
only where there is a value to keep and ``copy_values``: adapter gradients are small, but they
are copied only when the attempt may be retried) and torch's RNG states (dropout draws from
them), so a failed attempt can be undone exactly and the retry draws what the first attempt
drew.

>>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"))
True
>>> is_out_of_memory(RuntimeError("index out of range in self"))
False
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

__all__ = ["is_out_of_memory", "GradRollback"]

# what allocators say when an allocation fails (CPU, CUDA without OutOfMemoryError, MPS, XPU)
_OOM = re.compile(
    r"not enough memory|out of memory|can't allocate memory|cannot allocate memory"
    r"|failed to allocate|could not allocate",
    re.IGNORECASE,
)
_UNSAVED = object()  # a grad that held a value and was not copied


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` says an allocation failed (module doc)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and _OOM.search(str(exc)) is not None


class GradRollback:
    """What ``params``' ``.grad`` and torch's RNG states are now; `restore` puts them back.

    A grad that is None is recorded as such (free); one holding a value is copied only with
    ``copy_values``. ``exact`` says whether `restore` restores every grad.
    """

    def __init__(self, params: Iterable[torch.Tensor], copy_values: bool) -> None:
        self._params = list(params)
        self._grads = [
            None if p.grad is None else (p.grad.detach().clone() if copy_values else _UNSAVED)
            for p in self._params
        ]
        self.exact = all(g is not _UNSAVED for g in self._grads)
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> bool:
        """Put back every recorded grad (values bit for bit) and the RNG states; returns
        ``exact`` (False: grads that held a value before were left as the attempt left them)."""
        for p, g in zip(self._params, self._grads):
            if g is _UNSAVED:
                continue
            if g is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == g.shape:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
        return self.exact
