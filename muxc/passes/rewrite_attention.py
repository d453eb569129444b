"""Pass `rewrite_attention`: make attention chunk-aware when ``alignment="chunk"``.

Replaces every backbone ``aten.scaled_dot_product_attention`` node with a `ChunkAttention`
node reading the step's `MuxBatch`, so chunks attend to the K/V of their stream's earlier
chunks under a document mask. HF's eager attention (matmul, scale, mask, softmax, matmul) is
first rewritten to the equivalent SDPA call (`sdpa_from_eager`), and so is ALiBi's (Bloom's
``baddbmm``, `sdpa_from_alibi`: its chunk nodes rebuild the bias from key positions); an
attention-like softmax left
unrecognised (one whose probabilities feed a matmul) is refused rather than run unaware of the
chunks. Does not mutate the input: the rewrite happens on a copy of its graph (nodes and meta
copied, parameters and tensors shared) in a new MuxGraph. With
``alignment="pad"`` the input is returned as is (the history notes say so), unless a task
does prefix tuning: then every attention node becomes a `PrefixAttention`
(`muxc.passes.prefix_attention`), chunk-aware with ``alignment="chunk"``. A model whose
attention is none of these raises `UnsupportedPeftError` with a remedy.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from muxc.errors import UnsupportedPeftError
from muxc.ir import SDPA, ChunkAttention, MuxGraph
from muxc.options import Alignment
from muxc.passes.alibi_attention import sdpa_from_alibi
from muxc.passes.eager_attention import put_in_place, sdpa_from_eager, unmatched_attention
from muxc.passes.pass_base import CompileContext, PassResult, rewritable_copy
from muxc.passes.prefix_attention import prefix_records, with_prefix_attention

__all__ = ["rewrite_attention"]


def rewrite_attention(mux: MuxGraph, ctx: CompileContext) -> PassResult[MuxGraph]:
    """New MuxGraph, SDPA swapped for ChunkAttention (chunk alignment); does not mutate ``mux``."""
    prefixes = prefix_records(mux)
    if ctx.options.alignment is not Alignment.CHUNK:
        if prefixes:  # prefix tuning: each task's rows attend to its trained K/V first
            return PassResult(*with_prefix_attention(mux, prefixes))
        return PassResult(mux, "alignment='pad': attention left as exported")
    if prefixes:  # chunk-aware attention that also gives prefix tasks their K/V
        return PassResult(*with_prefix_attention(mux, prefixes, chunked=True))
    gm = rewritable_copy(mux)
    g = gm.graph
    eager = sdpa_from_eager(g)
    alibi = dict(sdpa_from_alibi(g))
    left = unmatched_attention(g)
    if left:
        raise UnsupportedPeftError(
            f"alignment='chunk': this {mux.model_type} model computes attention in a form muxc "
            f"does not recognise (softmax node {left[0].format_node()} feeds a matmul; "
            f"{len(left)} such nodes), so it cannot attend across chunks exactly; recognised are "
            "scaled_dot_product_attention and HF's eager attention "
            "(softmax(q @ k^T * scale + mask) @ v) and ALiBi's (Bloom: baddbmm(alibi, q, k^T)); "
            "use alignment='pad'"
        )
    if not any(n.op == "call_function" and n.target is SDPA for n in g.nodes):
        raise UnsupportedPeftError(
            f"alignment='chunk' needs scaled_dot_product_attention or HF's eager attention "
            f"(softmax(q @ k^T * scale + mask) @ v) in the backbone; this {mux.model_type} model "
            "has neither; use alignment='pad'"
        )
    mux_input = next(n for n in g.find_nodes(op="placeholder") if n.name == "mux")
    targets = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    for i, node in enumerate(targets):
        with g.inserting_before(node):
            new = g.create_node(
                "call_function", ChunkAttention(i, alibi.get(node)), (mux_input, *node.args),
                dict(node.kwargs),
                name=f"chunk_attention_{i}",
            )
        put_in_place(g, node, new)
    g.lint()
    gm.recompile()
    note = f"{len(targets)} attention nodes made chunk-aware"
    if eager:
        note += f" ({eager} from eager attention, rewritten to SDPA first)"
    if alibi:
        note += f" ({len(alibi)} from ALiBi attention, rewritten to SDPA with the bias as its mask)"
    return PassResult(replace(mux, gm=gm), note)
