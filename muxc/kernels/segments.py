"""Per-task token segments: the metadata every multi-task kernel shares.

Tokens of all tasks are laid out contiguously, task after task: segment ``i`` covers rows
``starts[i] : starts[i] + lens[i]`` of a ``(T, K)`` activation. Build one `Segments` per step and
pass it to every layer; device-side copies are cached on the object.

>>> s = Segments.of([3, 0, 2])
>>> s.starts, s.total
((0, 3, 3), 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from muxc.errors import KernelInputError

__all__ = ["Segments"]


@dataclass(frozen=True)
class Segments:
    """Token counts per task (zeros allowed) and their start offsets."""

    lens: tuple[int, ...]
    starts: tuple[int, ...]
    total: int
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @staticmethod
    def of(seg_lens: Segments | Sequence[int] | torch.Tensor) -> Segments:
        """Normalise a list/tuple/1-D tensor of non-negative token counts."""
        if isinstance(seg_lens, Segments):
            return seg_lens
        if isinstance(seg_lens, torch.Tensor):
            if seg_lens.dim() != 1:
                raise KernelInputError(
                    f"seg_lens must be 1-D, got shape {tuple(seg_lens.shape)}; "
                    "pass one token count per task"
                )
            seg_lens = seg_lens.tolist()
        lens = tuple(int(n) for n in seg_lens)
        if any(n < 0 for n in lens):
            raise KernelInputError(f"seg_lens must be >= 0, got {list(lens)}")
        starts, acc = [], 0
        for n in lens:
            starts.append(acc)
            acc += n
        return Segments(lens=lens, starts=tuple(starts), total=acc)

    def __len__(self) -> int:
        return len(self.lens)

    def bounds(self):
        """Yield ``(index, start, end)`` for every segment, empty ones included."""
        for i, (s, n) in enumerate(zip(self.starts, self.lens)):
            yield i, s, s + n

    def cached(self, key, build):
        """Return ``build()`` memoised under ``key`` (e.g. device tensors for one device)."""
        if key not in self._device_cache:
            self._device_cache[key] = build()
        return self._device_cache[key]

    def check_rows(self, name: str, t: torch.Tensor) -> None:
        """Raise unless ``t`` is 2-D with exactly ``total`` rows."""
        if t.dim() != 2 or t.shape[0] != self.total:
            raise KernelInputError(
                f"{name} must be 2-D with {self.total} rows (sum of seg_lens {list(self.lens)}), "
                f"got shape {tuple(t.shape)}; flatten leading dims and keep tasks contiguous"
            )
