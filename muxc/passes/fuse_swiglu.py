"""Pass `fuse_swiglu`: a gated MLP's ``silu(gate) * up`` becomes one `swiglu` node.

Contract. Input: a MuxGraph. Where a backbone ``aten.mul`` multiplies an ``aten.silu`` (read by
nothing else) by a tensor of the same shape and dtype, the pair becomes
``muxc.kernels.swiglu.swiglu(gate, up)``, which keeps ``gate`` and ``up`` for backward instead
of ``gate``, ``silu(gate)`` and ``up`` (one ``tokens x intermediate`` tensor less per layer,
about a sixth of what a Llama layer saves). It runs the same ATen kernels in the same order,
so losses and gradients are bit for bit the same. A silu feeding anything else, or a product
that broadcasts or casts, is left alone.

Does not mutate the input: the rewrite happens on a copy of its graph (nodes and meta copied,
tensors shared) in a new MuxGraph.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from muxc.ir import MuxGraph, Role, info
from muxc.ir.shapes import meta_val, same_sizes
from muxc.kernels.swiglu import swiglu
from muxc.passes.pass_base import CompileContext, PassResult, rewritable_copy

__all__ = ["fuse_swiglu"]

aten = torch.ops.aten


def fuse_swiglu(mux: MuxGraph, ctx: CompileContext) -> PassResult[MuxGraph]:
    """New MuxGraph with each ``silu(gate) * up`` pair fused; does not mutate ``mux``."""
    if not any(_pair(n) for n in mux.gm.graph.nodes):
        return PassResult(mux, "no silu(gate) * up product")
    gm = rewritable_copy(mux)
    g = gm.graph
    fused = 0
    for mul, (act, up) in [(n, p) for n in g.nodes if (p := _pair(n)) is not None]:
        with g.inserting_before(mul):
            new = g.call_function(swiglu, (act.args[0], up))
        new.meta.update(mul.meta)
        mul.replace_all_uses_with(new)
        g.erase_node(mul)
        g.erase_node(act)
        fused += 1
    g.lint()
    gm.recompile()
    return PassResult(replace(mux, gm=gm),
                      f"{fused} silu(gate) * up product(s) fused (swiglu: saves gate and up, "
                      "not silu(gate) too)")


def _pair(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(silu node, up)`` when ``node`` is a backbone ``silu(gate) * up`` it may fuse."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or node.kwargs:
        return None
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if info(node).role is not Role.BACKBONE:
        return None
    for i in (0, 1):
        act, up = node.args[i], node.args[1 - i]
        if act is up or act.op != "call_function" or act.target is not aten.silu.default:
            continue
        if len(act.users) != 1 or act.kwargs or not isinstance(act.args[0], fx.Node):
            continue
        vals = [meta_val(n) for n in (act.args[0], up, node)]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            continue
        if same_sizes(*(tuple(v.shape) for v in vals)) and len({v.dtype for v in vals}) == 1:
            return act, up
    return None
