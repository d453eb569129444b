"""Pass `rewrite_attention`: make attention chunk-aware when ``alignment="chunk"``.

Replaces every backbone ``aten.scaled_dot_product_attention`` node with a `ChunkAttention`
node reading the step's `MuxBatch`, so chunks attend to the K/V of their stream's earlier
chunks under a document mask. Mutates the MuxGraph in place and returns it. With
``alignment="pad"`` the graph is returned unchanged (the history summary says so). A model
whose attention is not SDPA (e.g. Bloom's ALiBi) raises `UnsupportedPeftError` with a remedy.
"""

from __future__ import annotations

from muxc.errors import UnsupportedPeftError
from muxc.ir import MuxGraph, NodeInfo, Role, info, set_info
from muxc.options import Alignment
from muxc.ir import SDPA, ChunkAttention

__all__ = ["rewrite_attention"]


def rewrite_attention(mux: MuxGraph, ctx) -> MuxGraph:
    """Swap SDPA nodes for ChunkAttention nodes (chunk alignment only; see module doc)."""
    if ctx.options.alignment is not Alignment.CHUNK:
        ctx.notes["rewrite_attention"] = "alignment='pad': attention left as exported"
        return mux
    g = mux.gm.graph
    mux_input = next(n for n in g.find_nodes(op="placeholder") if n.name == "mux")
    targets = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    if not targets:
        raise UnsupportedPeftError(
            f"alignment='chunk' needs scaled_dot_product_attention in the backbone; this "
            f"{mux.model_type} model has none (e.g. ALiBi or eager attention); use alignment='pad' "
            "or load the model with attn_implementation='sdpa'"
        )
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
    mux.gm.recompile()
    ctx.notes["rewrite_attention"] = f"{len(targets)} attention nodes made chunk-aware"
    return mux
