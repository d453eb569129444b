"""`ChunkAttention`: the merged graph's attention, able to attend across kept chunks.

`rewrite_attention` replaces every ``aten.scaled_dot_product_attention`` node of the backbone
with a `ChunkAttention`. Without a chunk step in the `MuxBatch` it is exactly the original
call. In a chunk step it prepends the K/V its stream's earlier chunks left in ``mux.kv``
(gathered to this step's rows, autograd intact), stores the result for the next chunk, and
attends under the step's document mask (each token sees only earlier tokens of its own sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.operator_schemas import normalize_function

from muxc.errors import MuxcInternalError
from muxc.runtime.batch import MuxBatch

__all__ = ["ChunkAttention", "SDPA"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class ChunkAttention:
    """Attention node ``index`` of the backbone (one per layer)."""

    index: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", f"chunk_attention_{self.index}")

    def __call__(self, mux: MuxBatch, *args, **kwargs) -> torch.Tensor:
        step = mux.chunk
        if step is None:
            return SDPA(*args, **kwargs)
        norm = normalize_function(SDPA, args, kwargs, normalize_to_only_use_kwargs=True)
        if norm is None:
            raise MuxcInternalError(f"cannot normalise attention arguments of node {self.index}")
        kw = dict(norm.kwargs)
        q, k, v = kw.pop("query"), kw.pop("key"), kw.pop("value")
        kw.pop("attn_mask", None)
        kw["is_causal"] = False
        if step.index > 0:
            past = mux.kv.get(self.index)
            if past is None:
                raise MuxcInternalError(f"attention {self.index}: no kept K/V for chunk {step.index}")
            pk, pv = past
            k = torch.cat([pk.index_select(0, step.gather), k], dim=-2)
            v = torch.cat([pv.index_select(0, step.gather), v], dim=-2)
        mux.kv[self.index] = (k, v)
        return SDPA(q, k, v, attn_mask=step.mask, **kw)

    def __repr__(self) -> str:
        return f"ChunkAttention({self.index})"
