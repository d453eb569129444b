"""Pass `replay_adapter_inputs`: adapter sites keep what makes a cheap input, not the input.

Contract. Input: a MuxGraph (after `fuse_swiglu`). Where the input ``x`` of adapter sites is
made by a few cheap ops from tensors those ops keep for backward anyway, a `Replay` node
(`muxc.kernels.replay`) goes between ``x`` and the sites, naming those ops and their roots. At
run time the LoRA and IA3 kernels then keep the roots (no extra memory: their ops keep them)
and compute ``x`` again in backward, bit for bit; on a Llama with LoRA on every linear that
drops the two norm outputs and the MLP product, about a third of a layer's saved activations.

Walking back from ``x`` (at most `MAX_OPS` ops), each op is

- an end, whose tensor arguments become roots: a product or quotient of two activations
  (keeps both when both need a gradient), `muxc.kernels.swiglu.swiglu` (keeps ``gate`` and
  ``up``), a layer or RMS norm (keeps its input; weight and bias are frozen);
- a step, walked through: a cast (``to.dtype``), ``getitem(native_layer_norm(...), 0)``, or a
  product, quotient, sum or difference of one activation and frozen weights or numbers;
- a root itself when it keeps its own output for backward (``rsqrt``, ``tanh``, ``sigmoid``,
  ``exp``).

Anything else (a GEMM, attention, a view with symbolic sizes) and the input is left alone.
Does not mutate the input: the rewrite happens on a copy of its graph in a new MuxGraph.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from muxc.ir import MuxGraph, NodeInfo, Role, info, set_info
from muxc.ir.shapes import meta_val
from muxc.kernels.replay import Replay, Slot
from muxc.kernels.swiglu import swiglu
from muxc.passes.pass_base import CompileContext, PassResult, rewritable_copy

__all__ = ["replay_adapter_inputs", "MAX_OPS"]

aten = torch.ops.aten

MAX_OPS = 6
"""Ops a replay may run: a norm's output is 3 (``mul``, cast, ``mul`` by the weight)."""

_PRODUCTS = {aten.mul.Tensor, aten.div.Tensor}
_SUMS = {aten.add.Tensor, aten.sub.Tensor}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
_KEEPS_OUTPUT = {aten.rsqrt.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default}


def replay_adapter_inputs(mux: MuxGraph, ctx: CompileContext) -> PassResult[MuxGraph]:
    """New MuxGraph, a `Replay` node before the sites of each replayable input; does not mutate
    ``mux``."""
    frozen = _frozen(mux.gm.graph, mux)
    if not any(_sites(n) and _recipe(n, frozen) for n in mux.gm.graph.nodes):
        return PassResult(mux, "no adapter input is made by cheap ops from kept tensors")
    gm = rewritable_copy(mux)
    g = gm.graph
    frozen = _frozen(g, mux)
    done = []
    for x in [n for n in g.nodes if _sites(n)]:
        found = _recipe(x, frozen)
        if found is None:
            continue
        ops, roots = found
        slots = {n: Slot(i) for i, n in enumerate((*roots, *ops))}
        steps = tuple((op.target, _slotted(op.args, slots), _slotted(op.kwargs, slots))
                      for op in ops)
        target = Replay(steps, tuple(r not in frozen for r in roots),
                        " -> ".join(op.name for op in ops))
        with g.inserting_after(x):
            node = g.call_function(target, (x, *roots))
        node.meta.update(x.meta)
        set_info(node, NodeInfo(Role.BACKBONE, info(x).tasks, sources=info(x).sources))
        for site in _sites(x):
            site.replace_input_with(x, node)
        done.append(f"{x.name} ({target.label})")
    g.lint()
    gm.recompile()
    return PassResult(replace(mux, gm=gm),
                      f"{len(done)} adapter input(s) computed again in backward from kept "
                      f"tensors instead of kept: {', '.join(done)}")


def _sites(node: fx.Node) -> list[fx.Node]:
    """The adapter sites reading ``node`` as their input."""
    return [u for u in node.users
            if u.op == "call_function" and info(u).role is Role.ADAPTER and u.args[0] is node]


def _frozen(graph: fx.Graph, mux: MuxGraph) -> set[fx.Node]:
    """The placeholders of ``graph`` bound to ``mux``'s frozen tensors."""
    return {n for n in graph.nodes if n.op == "placeholder" and n.name in mux.tensors
            and not mux.tensors[n.name].requires_grad}


def _slotted(value, slots: dict[fx.Node, Slot]):
    """An op's argument with each node replaced by its `Slot`."""
    return fx.node.map_arg(value, slots.__getitem__)


def _tensor_nodes(node: fx.Node, frozen: set[fx.Node]) -> list[fx.Node] | None:
    """``node``'s node arguments, all tensors (None when one is not, e.g. a symbolic size)."""
    out: list[fx.Node] = []
    for a in (*node.args, *node.kwargs.values()):
        for n in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(n, fx.Node):
                if n not in frozen and not isinstance(meta_val(n), torch.Tensor):
                    return None
                out.append(n)
    return out


def _recipe(x: fx.Node, frozen: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """``(ops from the roots to x, roots)`` when ``x`` can be replayed (module doc), else None;
    ``frozen``: the graph's frozen-weight placeholders."""
    ops: list[fx.Node] = []
    roots: list[fx.Node] = []

    def add_roots(nodes):
        roots.extend(n for n in nodes if n not in roots)

    node = x
    while len(ops) < MAX_OPS:
        if node.op != "call_function" or info(node).role is not Role.BACKBONE:
            return None
        args = _tensor_nodes(node, frozen)
        if args is None:
            return None
        t = node.target
        live = [a for a in args if a not in frozen]
        if node is not x and t in _KEEPS_OUTPUT:
            add_roots([node])
            break
        if t is swiglu or t in _NORMS or (t in _PRODUCTS and len(live) == 2 and len(args) == 2):
            ops.append(node)
            add_roots(args)
            break
        if t is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node) \
                and node.args[0].target is aten.native_layer_norm.default:
            norm = node.args[0]
            ops += [node, norm]
            add_roots(_tensor_nodes(norm, frozen) or [])
            break
        if len(live) != 1 or not (t is aten.to.dtype or t in _PRODUCTS or t in _SUMS):
            return None
        ops.append(node)
        add_roots([a for a in args if a in frozen])
        node = live[0]
    else:
        return None
    if not ops or not roots or any(r.op == "placeholder" and r not in frozen for r in roots):
        return None
    ops.reverse()
    return ops, roots
