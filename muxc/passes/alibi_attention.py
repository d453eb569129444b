"""Recognise ALiBi attention (Bloom) in an exported graph and turn it into one SDPA call.

Bloom's attention (transformers 5, either ``attn_implementation``) exports as::

    s = baddbmm(alibi, q3, transpose(k3, -1, -2), beta=b, alpha=a)  # (B*H, Q, K)
    s = view(s, [B, H, Q, -1])
    s = add(s, mask)                          # additive causal/padding mask; may be absent
    p = softmax(s, -1[, float32])             # then .to(dtype), dropout(p_drop, train)
    p = view(p, [B*H, Q, -1])
    o = bmm(p, v3)
    o = view(o, [B, H, Q, D])

where ``q3``, ``k3``, ``v3`` are ``(B*H, S, D)`` reshapes of the ``(B, H, S, D)`` projections and
``alibi`` is ``(B*H, 1, K)``: ``slope_h * position of key j`` (HF builds it from the attention
mask; softmax is shift-invariant per query, so a bias on keys only is ALiBi). That equals
``scaled_dot_product_attention(q, k, v, attn_mask=b * alibi.unflatten(0, (-1, H)) + mask,
dropout_p=p_drop, scale=a)``. `sdpa_from_alibi` rewrites every such subgraph into that call in
place and returns, per new SDPA node, the per-head slopes read from the graph (`alibi_slopes`
evaluates the subgraph that builds ``alibi`` and checks it is ``slope_h * position``), so chunk
alignment can rebuild the bias over kept K/V columns from their positions in the sample.

>>> found = sdpa_from_alibi(gm.graph)    # doctest: +SKIP
>>> [slopes for _, slopes in found][0]   # doctest: +SKIP
(0.25, 0.0625, 0.015625, 0.00390625)
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from muxc.errors import UnsupportedPeftError
from muxc.ir import SDPA, info, set_info
from muxc.passes.eager_attention import _CASTS, _SOFTMAX, _rank, _users, erase_matched

__all__ = ["AlibiAttention", "alibi_slopes", "match_alibi_attention", "sdpa_from_alibi"]

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_PROBE = 5  # key positions the slopes are checked on (0 .. _PROBE - 1)


@dataclass(frozen=True)
class AlibiAttention:
    """One recognised ALiBi attention: the SDPA operands and the nodes that compute it now."""

    q: fx.Node  # (B, H, S, D)
    k: fx.Node
    v: fx.Node
    alibi: fx.Node  # (B*H, 1, K)
    beta: float
    mask: fx.Node | None
    heads: int
    scale: float
    dropout_p: float
    out: fx.Node  # the view of the bmm back to (B, H, Q, D), replaced by the SDPA call
    nodes: tuple[fx.Node, ...]


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _split_heads(node: fx.Node, heads: int) -> fx.Node | None:
    """``x`` when ``node`` is a ``(B*H, S, D)`` reshape of a rank-4 ``(B, H, S, D)`` ``x``."""
    if not _call(node, _VIEWS) or _rank(node) != 3:
        return None
    x = node.args[0]
    shape = _shape(x) if isinstance(x, fx.Node) else None
    if shape is None or len(shape) != 4 or shape[1] != heads:
        return None
    return x


def _const(node: fx.Node, name: str, default: float) -> float | None:
    value = node.kwargs.get(name, default)
    return float(value) if isinstance(value, Number) and not isinstance(value, bool) else None


def _match(softmax: fx.Node) -> AlibiAttention | None:
    x, dim = softmax.args[0], softmax.args[1]
    rank = _rank(x)
    if rank != 4 or dim % rank != 3 or len(_users(softmax)) != 1:
        return None
    nodes, mask = [softmax], None
    if _call(x, (aten.add.Tensor,)) and len(_users(x)) == 1:
        scores, mask = x.args[0], x.args[1]
        if not (isinstance(mask, fx.Node) and _call(scores, _VIEWS)):
            return None
        nodes.append(x)
        x = scores
    if not _call(x, _VIEWS) or len(_users(x)) != 1:
        return None
    shape = _shape(x)
    heads = shape[1] if shape is not None else None
    bad = x.args[0]
    if not isinstance(heads, int) or not _call(bad, (aten.baddbmm.default,)):
        return None
    if len(_users(bad)) != 1:
        return None
    nodes += [x, bad]
    alibi, q3, kt = bad.args[:3]
    beta, alpha = _const(bad, "beta", 1.0), _const(bad, "alpha", 1.0)
    if beta is None or alpha is None or len(bad.args) > 3 or not _call(kt, (aten.transpose.int,)):
        return None
    if {d % 3 for d in kt.args[1:3]} != {1, 2} or _rank(alibi) != 3:
        return None
    q, k = _split_heads(q3, heads), _split_heads(kt.args[0], heads)
    if q is None or k is None:
        return None
    nodes += [n for n in (q3, kt, kt.args[0]) if len(_users(n)) == 1]
    # probabilities side: casts and dropout, a view to (B*H, Q, K), the bmm, a view back
    node, dropout_p = softmax, 0.0
    while True:
        users = _users(node)
        user = users[0] if len(users) == 1 else None
        if user is None or user.op != "call_function" or user.args[0] is not node:
            return None
        if user.target in _CASTS:
            pass
        elif user.target is aten.dropout.default:
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            dropout_p = float(user.args[1]) if train else 0.0
        elif user.target in _VIEWS and _rank(user) == 3:
            pass
        elif user.target is aten.bmm.default and _rank(node) == 3:
            v = _split_heads(user.args[1], heads)
            (out,) = _users(user) if len(_users(user)) == 1 else (None,)
            if v is None or not _call(out, _VIEWS) or _rank(out) != 4 or _shape(out)[1] != heads:
                return None
            if len(_users(user.args[1])) == 1:
                nodes.append(user.args[1])
            nodes += [user, out]
            return AlibiAttention(q, k, v, alibi, beta, mask, heads, alpha, dropout_p, out,
                                  tuple(nodes))
        else:
            return None
        nodes.append(user)
        node = user


def match_alibi_attention(graph: fx.Graph) -> list[AlibiAttention]:
    """Every ALiBi attention subgraph of ``graph``, in graph order; does not mutate."""
    return [m for n in graph.nodes if _call(n, _SOFTMAX) for m in [_match(n)] if m is not None]


def alibi_slopes(graph: fx.Graph, alibi: fx.Node, heads: int) -> tuple[float, ...]:
    """The per-head slopes of the ``(B*H, 1, K)`` ALiBi bias ``alibi`` computes; does not mutate.

    Copies the nodes ``alibi`` depends on into a small graph, runs it on an all-ones
    ``attention_mask`` of one row and checks the bias is ``slope_h * key position`` exactly
    (what chunk alignment rebuilds); raises `UnsupportedPeftError` otherwise.
    """
    needed, todo = set(), [alibi]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo += n.all_input_nodes
    inputs = [n for n in needed if n.op != "call_function"]
    if any(n.op != "placeholder" or n.name != "attention_mask" for n in inputs):
        raise UnsupportedPeftError(
            f"alignment='chunk': the ALiBi bias {alibi.format_node()} depends on "
            f"{sorted(n.name for n in inputs)}, not on the attention mask alone; muxc cannot "
            "rebuild it per chunk; use alignment='pad'"
        )
    sub, env = fx.Graph(), {}
    for n in graph.nodes:
        if n in needed:
            env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[alibi])
    (mask,) = inputs
    mask_val = mask.meta.get("val")
    device = mask_val.device if isinstance(mask_val, torch.Tensor) else torch.device("cpu")
    with torch.no_grad():
        ones = torch.ones(1, _PROBE, dtype=torch.long, device=device)
        bias = fx.GraphModule(torch.nn.Module(), sub)(ones)
    bias = bias.reshape(heads, _PROBE).float().cpu()
    slopes = bias[:, 1].clone()
    expected = slopes[:, None] * torch.arange(_PROBE, dtype=torch.float32)[None, :]
    if not torch.equal(bias, expected.to(bias.dtype)):
        raise UnsupportedPeftError(
            f"alignment='chunk': the ALiBi bias {alibi.format_node()} is not slope * key position "
            f"(on an unpadded row of {_PROBE} tokens it is {bias.tolist()}); muxc cannot rebuild "
            "it per chunk; use alignment='pad'"
        )
    return tuple(float(s) for s in slopes)


def _fake(graph: fx.Graph, node: fx.Node) -> None:
    """Set ``node.meta['val']`` by running its target on its inputs' fake values."""
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode(vals)
    if mode is None:
        return
    args = fx.node.map_arg(node.args, lambda a: a.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: a.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def sdpa_from_alibi(graph: fx.Graph) -> list[tuple[fx.Node, tuple[float, ...]]]:
    """Rewrite each ALiBi attention of ``graph`` into one SDPA call whose float mask is the
    ALiBi bias plus the mask, in place; returns ``(sdpa node, slopes)`` per rewrite.

    The SDPA node takes the final view's meta and muxc record; the matched nodes left without
    users (and their metadata assertions) are erased. Mutates ``graph``: callers pass a copy.
    """
    matches = match_alibi_attention(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = []
    for m in matches:
        slopes = alibi_slopes(graph, m.alibi, m.heads)
        rec = info(m.out)
        with graph.inserting_before(m.out):
            bias = graph.call_function(aten.unflatten.int, (m.alibi, 0, [-1, m.heads]))
            extra = [bias]
            if m.beta != 1.0:
                bias = graph.call_function(aten.mul.Tensor, (bias, m.beta))
                extra.append(bias)
            if m.mask is not None:
                bias = graph.call_function(aten.add.Tensor, (bias, m.mask))
                extra.append(bias)
            new = graph.call_function(
                SDPA, (m.q, m.k, m.v),
                {"attn_mask": bias, "dropout_p": m.dropout_p, "is_causal": False, "scale": m.scale},
            )
        for n in extra:
            _fake(graph, n)
            set_info(n, rec)
        new.meta.update(m.out.meta)
        set_info(new, rec)
        m.out.replace_all_uses_with(new)
        erase_matched(graph, m.nodes, order)
        found.append((new, slopes))
    return found
