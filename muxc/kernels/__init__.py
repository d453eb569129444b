"""Multi-task adapter kernels behind a declarative registry.

`multi_lora` and `multi_ia3` apply every task's adapter to its own token segment in one op
(one launch per op kind per layer, whatever the number of tasks). Implementations register in
`muxc.kernels.registry`; the torch reference always exists, Triton kernels register when
triton imports.

Files: ``lora.py`` and ``ia3.py`` each hold one family: Triton kernels, launchers, the public
op with its autograd, and the torch reference. ``_triton.py`` holds what they share: the
guarded triton import, the registry checker, per-step segment metadata (row tiles cached on
`Segments`, per-task pointer tables cached by content), the launch counter tests read, and the
autotuner. ``segments.py`` and ``registry.py`` are the seam the core compiles against.
"""

from __future__ import annotations

from muxc.kernels import registry
from muxc.kernels.ia3 import multi_ia3, multi_ia3_ref
from muxc.kernels.lora import multi_lora, multi_lora_ref
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = ["multi_lora", "multi_lora_ref", "multi_ia3", "multi_ia3_ref", "Segments", "Impl",
           "registry"]
