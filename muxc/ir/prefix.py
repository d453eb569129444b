"""Prefix tuning in a merged graph: each attention call gives a task's rows its trained K/V.

How HF PEFT runs prefix tuning (``PeftModelForCausalLM.forward``, ``get_prompt``): the prefix
encoder maps the ``n`` virtual tokens to a table of ``(n, layers * 2 * token_dim)`` (an
``Embedding``, or ``Embedding -> Linear -> Tanh -> Linear`` with ``prefix_projection``); layer
``l`` reads columns ``[2l, 2l+2) * token_dim`` as ``(K | V, heads, head_dim)``, where ``heads``
is the model's key/value head count (PEFT sets ``num_attention_heads`` to
``num_key_value_heads`` for grouped-query attention). Those K/V pre-fill the cache, the
attention mask gets ``n`` leading ones and the new tokens' positions start at ``n``. So at every
attention call each query of the task sees ``[prefix ; own keys]``: the ``n`` prefix columns
unmasked, never rotated (RoPE was applied to new tokens only), then exactly the causal and
padding mask it had without a prefix.

muxc's design (the simplest exact one): `PrefixAttention` replaces the backbone's
``scaled_dot_product_attention`` node ``index``. It runs one attention call per prefix task on
that task's rows with ``[P_k ; K]``, ``[P_v ; V]`` and ``[ones(n) ; mask]`` (K/V repeated to the
query heads where HF repeated them before SDPA), and one call over all other rows, exactly as
before; the outputs are concatenated back in row order. Other tasks' rows are untouched, bit for
bit. Each call computes its layer's slice of the task's table from the encoder parameters (for
``prefix_projection`` the first Linear and Tanh once per layer, the second only for the layer's
columns), so gradients reach the user's parameters through plain autograd and no tensor crosses
between layers. Positions are not this op's business: the runtime gives the task's rows
positions shifted by ``n`` as HF numbers them (`muxc.runtime.positions`).

With chunk alignment (``chunked``) it first does what `muxc.ir.ChunkAttention` does (prepend
the K/V its stream's earlier chunks kept, keep the result, attend under the step's document
mask), then prepends the prefix to the prefix tasks' rows as above: every packed sample of a
stream sees the prefix as if it began the sequence, as each sample does in its own PEFT row
(positions restart at ``n`` per sample). The prefix itself is never kept across chunks.

>>> PrefixAttention(0, 2, ())
PrefixAttention(0/2; )
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muxc.errors import MuxcInternalError
from muxc.ir.graph import AdapterRecord

__all__ = ["PrefixAttention", "prefix_kv", "PREFIX_ROLES", "POSITION_RULES", "task_positions"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# the record's parameter roles: the embedding alone, or with PEFT's two-layer MLP
PREFIX_ROLES = ("embedding", "w1", "b1", "w2", "b2")


def prefix_kv(params: dict[str, torch.Tensor], index: int, layers: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s prefix ``(K, V)``, each ``(heads, n, head_dim)``, from the encoder
    parameters (``PREFIX_ROLES``), as PEFT's ``get_prompt`` lays them out."""
    emb = params["embedding"]
    if "w2" in params:
        width = params["w2"].shape[0] // (2 * layers)
        rows = slice(2 * index * width, 2 * (index + 1) * width)
        hidden = torch.tanh(F.linear(emb, params["w1"], params["b1"]))
        table = F.linear(hidden, params["w2"][rows], params["b2"][rows])
    else:
        width = emb.shape[1] // (2 * layers)
        table = emb[:, 2 * index * width : 2 * (index + 1) * width]
    n = emb.shape[0]
    if width % head_dim:
        raise MuxcInternalError(f"prefix width {width} is not a multiple of head_dim {head_dim}")
    kv = table.reshape(n, 2, width // head_dim, head_dim).permute(1, 2, 0, 3)
    return kv[0], kv[1]


@dataclass(frozen=True, eq=False)
class PrefixAttention:
    """Attention node ``index`` of ``layers``, called as ``(mux, *params, query=, key=, value=,
    attn_mask=, ...)`` (SDPA's keyword arguments); ``params`` are ``records``' parameters in
    order. See the module doc."""

    index: int
    layers: int
    records: tuple[AdapterRecord, ...]
    chunked: bool = False  # chunk alignment: also keep and prepend earlier chunks' K/V

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", f"prefix_attention_{self.index}")

    def params_by_task(self, flat) -> dict[str, dict[str, torch.Tensor]]:
        out, i = {}, 0
        for r in self.records:
            out[r.task] = dict(zip(r.params, flat[i : i + len(r.params)]))
            i += len(r.params)
        if i != len(flat):
            raise MuxcInternalError(f"prefix attention {self.index}: {len(flat)} params, expected {i}")
        return out

    def __call__(self, mux, *flat, query, key, value, attn_mask=None, dropout_p=0.0,
                 is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
        params = self.params_by_task(flat)
        kw = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        step = mux.chunk if self.chunked else None
        if step is not None:  # as `ChunkAttention`: earlier chunks' K/V first, the step's mask
            if step.index > 0:
                past = mux.kv.get(self.index)
                if past is None:
                    raise MuxcInternalError(f"attention {self.index}: no kept K/V for chunk {step.index}")
                key = torch.cat([past[0].index_select(0, step.gather), key], dim=-2)
                value = torch.cat([past[1].index_select(0, step.gather), value], dim=-2)
            mux.kv[self.index] = (key, value)  # the prefix is not kept: each call prepends it
            attn_mask, is_causal = step.mask, False
        if not any(t in params for t in mux.tasks):
            return SDPA(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kw)
        # row segments in layout order: each prefix task alone, runs of other tasks together
        segments: list[tuple[str | None, int, int]] = []
        for t in mux.tasks:
            lo, hi = mux.row_range(t)
            mine = t if t in params else None
            if segments and mine is None and segments[-1][0] is None:
                segments[-1] = (None, segments[-1][1], hi)
            else:
                segments.append((mine, lo, hi))
        outs = []
        for task, lo, hi in segments:
            mask = _rows(attn_mask, lo, hi)
            q, k, v = query[lo:hi], key[lo:hi], value[lo:hi]
            if task is None:
                outs.append(SDPA(q, k, v, attn_mask=mask, is_causal=is_causal, **kw))
                continue
            pk, pv = prefix_kv(params[task], self.index, self.layers, q.shape[-1])
            if pk.shape[0] != k.shape[1]:  # HF repeated K/V to the query heads before SDPA
                if k.shape[1] % pk.shape[0]:
                    raise MuxcInternalError(f"prefix attention {self.index}: {pk.shape[0]} "
                                            f"prefix heads for {k.shape[1]} key heads")
                rep = k.shape[1] // pk.shape[0]
                pk, pv = pk.repeat_interleave(rep, 0), pv.repeat_interleave(rep, 0)
            rows, n = hi - lo, pk.shape[1]
            pk = pk.to(k.dtype).unsqueeze(0).expand(rows, -1, -1, -1)
            pv = pv.to(v.dtype).unsqueeze(0).expand(rows, -1, -1, -1)
            s_q, s_k = q.shape[-2], k.shape[-2]
            if mask is None:  # what SDPA's is_causal means (top-left aligned), or no mask
                mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
                mask = mask.tril() if is_causal else mask
            seen = (torch.ones((), dtype=torch.bool, device=q.device) if mask.dtype == torch.bool
                    else torch.zeros((), dtype=mask.dtype, device=q.device))
            lead = seen.expand(*mask.shape[:-1], n)
            full = torch.cat([lead, mask], dim=-1)
            outs.append(SDPA(q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2),
                             attn_mask=full, is_causal=False, **kw))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def __repr__(self) -> str:
        tasks = ",".join(r.task for r in self.records)
        chunked = "; chunked" if self.chunked else ""
        return f"PrefixAttention({self.index}/{self.layers}; {tasks}{chunked})"


def _rows(mask: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask[lo:hi]


# How each model family numbers positions when HF is not given ``position_ids`` and a prefix of
# ``n`` tokens is in the cache (transformers 5): "arange" (Llama, GPT-2: ``arange(S) + n``
# whatever the mask) or "cumsum" (OPT: ``cumsum`` of the ``[ones(n); mask]`` mask, times it,
# minus one, cut to the new tokens: ``(cumsum(mask) + n) * mask - 1``). With ``n = 0`` each is
# what HF computes without a prefix. Families not listed are refused for prefix tuning: Bloom
# (ALiBi: its bias would have to span the prefix columns) and Falcon (PEFT's prefix K/V do not
# fit its multi-query attention: HF itself fails on them).
POSITION_RULES = {"gpt2": "arange", "llama": "arange", "opt": "cumsum", **dict.fromkeys(
    ("qwen2", "qwen3", "mistral", "gemma", "gpt_neox", "phi", "stablelm", "gpt_bigcode"), "arange")}


def task_positions(model_type: str, mask: torch.Tensor, offset: int) -> torch.Tensor:
    """``(rows, S)`` position ids of one task's rows, as HF numbers them after ``offset``
    prefix tokens (`POSITION_RULES`).

    >>> task_positions("opt", torch.tensor([[1, 1, 0]]), 2).tolist()
    [[2, 3, -1]]
    """
    rule = POSITION_RULES.get(model_type)
    if rule == "arange":
        seq = torch.arange(mask.shape[1], device=mask.device, dtype=torch.long) + offset
        return seq.expand(mask.shape[0], -1)
    if rule == "cumsum":
        m = mask.long()
        return (torch.cumsum(m, dim=1) + offset) * m - 1
    raise MuxcInternalError(f"no position rule for model type {model_type!r}")
