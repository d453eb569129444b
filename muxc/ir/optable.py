"""What muxc knows about the aten ops of an exported graph: GEMMs, views, free ops, attention.

One table for every reader of a graph's ops (the partition pass groups adapters with the GEMM
they attach to and prices ops in FLOPs; the planner's summary prices them with its cost model),
keyed by overload packet so ``aten.mm.default`` and any other overload of ``mm`` agree.

- ``GEMMS``: matrix products, priced ``2*M*K*N``; ``WEIGHT_GEMMS`` may multiply activations by
  a weight matrix (``x @ W``, the base ops adapters attach to; bitsandbytes-quantized linears
  included); ``MATMULS`` multiply two
  activations (batched or not: eager attention's ``q @ k.T``). ``mm`` and ``matmul`` are both.
- ``VIEWS``: ops that only rewrite metadata (never copy); ``FREE``: views plus size queries and
  asserts, which cost nothing. `aliases_input` is the wider schema fact: the op's output may
  share its input's storage (views, and ops such as ``to``/``reshape``/``contiguous`` that
  copy only when they must).
- `attention_call`: the SDPA arguments of an attention node (plain SDPA or `ChunkAttention`).

>>> is_gemm(next(n for n in mux.gm.graph.nodes if n.name == "linear"))   # doctest: +SKIP
True
>>> gemm_operands(addmm_node)         # addmm(bias, x, w): the factors   # doctest: +SKIP
(x, w)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from muxc.ir.ops import SDPA, ChunkAttention
from muxc.ir.prefix import PrefixAttention
from muxc.ir.quant import QUANT_LINEARS

__all__ = [
    "FREE",
    "GEMMS",
    "MATMULS",
    "VIEWS",
    "WEIGHT_GEMMS",
    "aliases_input",
    "attention_call",
    "gemm_operands",
    "has_bias",
    "is_gemm",
    "is_view",
    "packet",
]

aten = torch.ops.aten

VIEWS = frozenset({
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute,
    aten.unsqueeze, aten.squeeze, aten.expand, aten.slice, aten.select, aten.alias, aten.detach,
    aten.as_strided, aten.split, aten.split_with_sizes, aten.unbind, aten.chunk,
})
FREE = VIEWS | {aten.sym_size, aten._assert_tensor_metadata, aten.lift_fresh_copy}
# a quantized base's frozen linears (`muxc.ir.quant`: ``(x, weight, bias, state...)``) count
# as weight GEMMs: adapters attach to them, and the cost model prices their product
WEIGHT_GEMMS = frozenset({aten.linear, aten.mm, aten.addmm, aten.matmul}) | QUANT_LINEARS
MATMULS = frozenset({aten.mm, aten.matmul, aten.bmm, aten.baddbmm})
GEMMS = WEIGHT_GEMMS | MATMULS
_ADD_FIRST = frozenset({aten.addmm, aten.baddbmm})  # (input, a, b): input + a @ b


def packet(target) -> object | None:
    """The overload packet of an aten op target (``aten.mm`` for ``aten.mm.default``)."""
    return getattr(target, "overloadpacket", None)


def is_view(node: fx.Node) -> bool:
    """Does ``node`` only rewrite metadata (a view, reshape, slice, split...)?"""
    return node.op == "call_function" and packet(node.target) in VIEWS


def is_gemm(node: fx.Node) -> bool:
    """Is ``node`` a matrix product (linear, mm, addmm, bmm, matmul, baddbmm)?"""
    return node.op == "call_function" and packet(node.target) in GEMMS


def gemm_operands(node: fx.Node) -> tuple[object, object]:
    """The two factors of a GEMM node's product (``addmm(bias, x, w)`` -> ``(x, w)``)."""
    if packet(node.target) in _ADD_FIRST:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def has_bias(node: fx.Node) -> bool:
    """Does a GEMM node add a bias (addmm, baddbmm, or linear with a bias argument)?"""
    return packet(node.target) in _ADD_FIRST or (len(node.args) > 2 and node.args[2] is not None)


def aliases_input(target) -> bool:
    """May the op's output share storage with its input (its schema returns a read alias)?

    ``operator.getitem`` (of a split's or an op's tuple) counts as an alias too.
    """
    if target is operator.getitem:
        return True
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    a = schema.returns[0].alias_info
    return a is not None and not a.is_write


def attention_call(node: fx.Node) -> tuple[tuple, dict, bool] | None:
    """``(sdpa_args, sdpa_kwargs, chunked)`` of an attention node, else None.

    ``sdpa_args`` start with ``q, k, v`` as in ``scaled_dot_product_attention``; ``chunked``
    is True for a `ChunkAttention` node (whose first argument, the step's batch, is dropped):
    in a chunk step it may attend to the kept K/V of earlier chunks.
    """
    if node.op != "call_function":
        return None
    if node.target is SDPA:
        return tuple(node.args), dict(node.kwargs), False
    if isinstance(node.target, ChunkAttention):
        return tuple(node.args[1:]), dict(node.kwargs), True
    if isinstance(node.target, PrefixAttention):  # SDPA's arguments are its keywords
        kw = dict(node.kwargs)
        return (kw.pop("query"), kw.pop("key"), kw.pop("value")), kw, node.target.chunked
    return None
