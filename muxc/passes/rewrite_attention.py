"""Pass `rewrite_attention`: make attention chunk-aware when ``alignment="chunk"``.

Replaces every backbone ``aten.scaled_dot_product_attention`` node with a `ChunkAttention`
node reading the step's `MuxBatch`, so chunks attend to the K/V of their stream's earlier
chunks under a document mask. Does not mutate the input: the rewrite happens on a copy of its
graph (nodes and meta copied, parameters and tensors shared) in a new MuxGraph. With
``alignment="pad"`` the input is returned as is (the history notes say so). A model whose
attention is not SDPA (e.g. Bloom's ALiBi) raises `UnsupportedPeftError` with a remedy.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch.fx as fx

from muxc.errors import UnsupportedPeftError
from muxc.ir import SDPA, ChunkAttention, MuxGraph, NodeInfo, Role, info, set_info
from muxc.options import Alignment
from muxc.passes.pass_base import CompileContext, PassResult

__all__ = ["rewrite_attention"]


def rewrite_attention(mux: MuxGraph, ctx: CompileContext) -> PassResult[MuxGraph]:
    """New MuxGraph, SDPA swapped for ChunkAttention (chunk alignment); does not mutate ``mux``."""
    if ctx.options.alignment is not Alignment.CHUNK:
        return PassResult(mux, "alignment='pad': attention left as exported")
    seq_cls = sorted(t for t, h in mux.heads.items() if h.problem == "seq_cls")
    if seq_cls:
        raise UnsupportedPeftError(
            f"task(s) {seq_cls}: sequence classification with alignment='chunk' is not supported "
            "yet: the head pools each sample's last non-padding token, which chunk packing moves "
            "into another chunk step than the rest of its sample, and the per-chunk loss has no "
            "place for a per-sample label; use alignment='pad' (spatial, temporal and auto "
            "fusion all work there)"
        )
    if not any(n.op == "call_function" and n.target is SDPA for n in mux.gm.graph.nodes):
        raise UnsupportedPeftError(
            f"alignment='chunk' needs scaled_dot_product_attention in the backbone; this "
            f"{mux.model_type} model has none (e.g. ALiBi or eager attention); use alignment='pad' "
            "or load the model with attn_implementation='sdpa'"
        )
    gm = fx.GraphModule(mux.gm, copy.deepcopy(mux.gm.graph), class_name=type(mux.gm).__name__)
    g = gm.graph
    mux_input = next(n for n in g.find_nodes(op="placeholder") if n.name == "mux")
    targets = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    for i, node in enumerate(targets):
        with g.inserting_before(node):
            new = g.create_node(
                "call_function", ChunkAttention(i), (mux_input, *node.args), dict(node.kwargs),
                name=f"chunk_attention_{i}",
            )
        new.meta.update(node.meta)
        rec = info(node)
        set_info(new, NodeInfo(Role.BACKBONE, rec.tasks, sources=rec.sources))
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.lint()
    gm.recompile()
    return PassResult(replace(mux, gm=gm), f"{len(targets)} attention nodes made chunk-aware")
