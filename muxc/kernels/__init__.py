"""Multi-task adapter kernels behind a declarative registry.

`multi_lora` and `multi_ia3` apply every task's adapter to its own token segment in one op
(one launch per op kind per layer, whatever the number of tasks). Implementations register in
`muxc.kernels.registry`; the torch reference always exists, Triton kernels register when
triton imports.
"""

from __future__ import annotations

from muxc.kernels import registry
from muxc.kernels.ia3 import multi_ia3, multi_ia3_ref
from muxc.kernels.lora import multi_lora, multi_lora_ref
from muxc.kernels.registry import Impl
from muxc.kernels.segments import Segments

__all__ = ["multi_lora", "multi_lora_ref", "multi_ia3", "multi_ia3_ref", "Segments", "Impl",
           "registry"]
