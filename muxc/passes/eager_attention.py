"""Recognise eager attention in an exported graph and turn it into one SDPA call.

HF's ``eager_attention_forward`` (Llama, Mistral, Qwen, OPT, GPT-2, ... in transformers 5)
exports as::

    s = matmul(q, transpose(k, -1, -2))     # or (2, 3)
    s = mul(s, scale)                       # or div(s, c); absent when q was scaled earlier
    s = add(s, mask)                        # additive causal/padding mask; absent without one
    p = softmax(s, -1[, float32])           # then .to(dtype), dropout(p_drop, train)
    out = matmul(p, v)

which equals ``scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop,
scale=scale)``. `sdpa_from_eager` rewrites every such subgraph into that call in place, so
chunk alignment's `ChunkAttention` (which replaces SDPA nodes) serves eager models too.
Patterns this module does not recognise are left as they are (Bloom's ALiBi ``baddbmm`` is
`muxc.passes.alibi_attention`'s); `rewrite_attention` refuses what no rewrite recognised.

>>> n = sdpa_from_eager(gm.graph)      # doctest: +SKIP
>>> n                                  # doctest: +SKIP
2
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch
import torch.fx as fx

from muxc.ir import SDPA, NodeInfo, Role, info, set_info

__all__ = ["EagerAttention", "match_eager_attention", "sdpa_from_eager", "unmatched_attention"]

aten = torch.ops.aten
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_MATMUL = (aten.matmul.default, aten.bmm.default)
_SCALE = (aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor)  # mul first
# value-preserving steps allowed between the softmax and the matmul with V
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default)
_ASSERT = aten._assert_tensor_metadata.default


@dataclass(frozen=True)
class EagerAttention:
    """One recognised eager attention: the SDPA operands and the nodes that compute it now."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float
    dropout_p: float
    out: fx.Node  # the final matmul with V, replaced by the SDPA call
    nodes: tuple[fx.Node, ...]  # the matched nodes from the scores' matmul to ``out``


def put_in_place(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    """``new`` (an attention node of the backbone) takes ``old``'s place: its meta, a backbone
    record with ``old``'s tasks and sources, and its users; ``old`` is erased."""
    new.meta.update(old.meta)
    rec = info(old)
    set_info(new, NodeInfo(Role.BACKBONE, rec.tasks, sources=rec.sources))
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def erase_matched(graph: fx.Graph, nodes, order: dict[fx.Node, int]) -> None:
    """Erase the replaced pattern ``nodes`` that nothing uses any more, users before producers
    (``order``: the graph's node order), with the metadata asserts hanging off them."""
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        for a in [u for u in node.users if u.target is _ASSERT]:
            graph.erase_node(a)
        if not node.users:
            graph.erase_node(node)


def _users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than metadata assertions."""
    return [u for u in node.users if not (u.op == "call_function" and u.target is _ASSERT)]


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _is_last_two_transpose(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.transpose.int:
        return False
    rank = _rank(node.args[0])
    if rank is None:
        return False
    dims = {d % rank for d in node.args[1:3]}
    return dims == {rank - 2, rank - 1}


def _scores(node: fx.Node) -> tuple[fx.Node, fx.Node, float, list[fx.Node]] | None:
    """``(q, k, scale, nodes)`` when ``node`` is ``matmul(q, k^T)`` times constants."""
    scale, nodes = 1.0, []
    while node.op == "call_function" and node.target in _SCALE:
        tensor, const = node.args
        if not isinstance(const, Number) or isinstance(const, bool) or len(_users(node)) != 1:
            return None
        scale = scale * const if node.target in _SCALE[:2] else scale / const
        nodes.append(node)
        node = tensor
    if node.op != "call_function" or node.target not in _MATMUL or len(_users(node)) != 1:
        return None
    q, kt = node.args
    if not _is_last_two_transpose(kt):
        return None
    nodes.append(node)
    if len(_users(kt)) == 1:
        nodes.append(kt)
    return q, kt.args[0], float(scale), nodes


def _match(softmax: fx.Node) -> EagerAttention | None:
    x, dim = softmax.args[0], softmax.args[1]
    rank = _rank(x)
    if rank is None or rank < 3 or dim % rank != rank - 1 or len(_users(softmax)) != 1:
        return None
    # scores side: optional additive mask
    mask, nodes = None, [softmax]
    scores = _scores(x)
    if scores is None and x.op == "call_function" and x.target is aten.add.Tensor \
            and len(_users(x)) == 1 and all(isinstance(a, fx.Node) for a in x.args[:2]):
        for s, m in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            scores = _scores(s)
            if scores is not None:
                mask = m
                nodes.append(x)
                break
    if scores is None:
        return None
    q, k, scale, score_nodes = scores
    nodes.extend(score_nodes)
    # probabilities side: casts and dropout, then the matmul with V
    node, dropout_p = softmax, 0.0
    while True:
        (user,) = _users(node) if len(_users(node)) == 1 else (None,)
        if user is None or user.op != "call_function":
            return None
        if user.target in _CASTS and user.args[0] is node:
            pass
        elif user.target is aten.dropout.default and user.args[0] is node:
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            dropout_p = float(user.args[1]) if train else 0.0
        elif user.target in _MATMUL and user.args[0] is node:
            return EagerAttention(q, k, user.args[1], mask, scale, dropout_p, user,
                                  tuple(nodes) + (user,))
        else:
            return None
        nodes.append(user)
        node = user


def match_eager_attention(graph: fx.Graph) -> list[EagerAttention]:
    """Every eager attention subgraph of ``graph``, in graph order; does not mutate."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _SOFTMAX:
            m = _match(node)
            if m is not None:
                found.append(m)
    return found


def sdpa_from_eager(graph: fx.Graph) -> int:
    """Rewrite each eager attention of ``graph`` into one SDPA call, in place; returns how many.

    The SDPA node takes the final matmul's meta and muxc record; the matched nodes left without
    users (and their metadata assertions) are erased. Mutates ``graph``: callers pass a copy.
    """
    matches = match_eager_attention(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for m in matches:
        with graph.inserting_before(m.out):
            new = graph.call_function(
                SDPA, (m.q, m.k, m.v),
                {"attn_mask": m.mask, "dropout_p": m.dropout_p, "is_causal": False, "scale": m.scale},
            )
        new.meta.update(m.out.meta)
        set_info(new, info(m.out))
        m.out.replace_all_uses_with(new)
        erase_matched(graph, m.nodes, order)
    return len(matches)


def unmatched_attention(graph: fx.Graph) -> list[fx.Node]:
    """Softmax nodes whose probabilities (through casts, dropout and views) feed a matmul: an
    attention `match_eager_attention` did not recognise (run it first); does not mutate."""
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    left = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _SOFTMAX:
            continue
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            for u in _users(n):
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if u.target in _MATMUL or u.target is aten.baddbmm.default:
                    left.append(node)
                    todo = []
                    break
                if u.target in _CASTS or u.target in views or u.target is aten.dropout.default:
                    todo.append(u)
    return left
