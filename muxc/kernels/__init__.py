"""Multi-task adapter kernels behind a declarative registry.

`multi_lora` and `multi_ia3` apply every task's adapter to its own token segment in one op
(one launch per op kind per layer, whatever the number of tasks). Implementations register in
`muxc.kernels.registry`; the torch reference always exists, Triton kernels register when
triton imports.

Files: ``lora.py`` and ``ia3.py`` each hold one family: Triton kernels, launchers, the public
op and the torch reference (a per-task loop). ``grouped.py`` holds the CPU default for both
families: a few large torch ops per layer instead of a loop over tasks. ``op.py`` defines each
family's forward/backward custom ops and their autograd from two schemas. ``_triton.py``
holds what the Triton kernels share: the guarded triton import, the registry checker, per-step
segment metadata (row tiles cached on `Segments`, per-task pointer tables cached by content),
the launch counter tests read, and the autotuner. ``segments.py`` and ``registry.py`` are the
seam the core compiles against.
"""

from __future__ import annotations

from muxc.kernels import grouped, registry
from muxc.kernels.ia3 import multi_ia3, multi_ia3_ref
from muxc.kernels.lora import multi_lora, multi_lora_ref
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = ["multi_lora", "multi_lora_ref", "multi_ia3", "multi_ia3_ref", "Segments", "Impl",
           "registry", "grouped"]
