"""`young_garbage`: free the reference cycles a compile drops soon after it drops them, at the
cost of walking only the objects the compile made.

A compile makes and drops many objects held in reference cycles: every fx ``GraphModule`` and
its ``Graph`` refer to each other, and torch.export's fake tensors, modes and tracers form
cycles. Python's cyclic gc frees such objects only when it collects the generation they have
reached, and it collects the oldest generation only once that has grown by a quarter, so the
graphs a compile drops pile up and raise the heap's high-water mark. The process's RSS keeps
that mark: pymalloc and glibc hand back little of a heap fragmented by the compile's
long-lived objects. Collecting after every export and every pass frees them early, but a full
collection walks every object of the process (~470k after importing torch, transformers and
PEFT, ~220 ms on the 2-vCPU test VM). Inside `young_garbage` the objects that existed before it
are frozen (``gc.freeze``), so `collect_young` walks only those made since; on exit they are
unfrozen.

A block opened while another is open (nested, or in another thread) freezes nothing more; the
outermost exit unfreezes. When the process had frozen objects of its own (``gc.freeze`` before
forking workers, say) or has gc disabled, nothing is frozen or unfrozen and `collect_young`
does nothing. Measured in the README (Memory on the weights-dominant model).

>>> with young_garbage():
...     _ = collect_young()
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["young_garbage", "collect_young"]

_lock = threading.Lock()
_depth = 0  # open blocks
_frozen = False  # whether the outermost open block froze the heap


@contextlib.contextmanager
def young_garbage() -> Iterator[None]:
    """Freeze the objects that exist now, for `collect_young` (module doc); unfreeze on exit
    (the outermost block only, after a last young collection)."""
    global _depth, _frozen
    with _lock:
        if _depth == 0:
            _frozen = gc.isenabled() and gc.get_freeze_count() == 0
            if _frozen:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _frozen:
                gc.collect()
                gc.unfreeze()
                _frozen = False


def collect_young() -> int:
    """Collect the unreachable objects made since the outermost `young_garbage` block began;
    returns how many were found (0, doing nothing, outside a block that froze the heap)."""
    return gc.collect() if _frozen else 0
