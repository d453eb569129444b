"""Pass `fuse_lm_head_loss`: fuse the shared frozen LM head into each task's loss.

Contract. Input: a MuxGraph from `merge_backbones` (attention already rewritten). Where a
backbone ``aten.linear`` whose weight (and bias, if any) are frozen tensors feeds only
`TaskLoss` nodes, each ``TaskLoss(t)(logits, mux)`` becomes ``LMHeadLoss(t)(hidden, mux,
weight[, bias])`` and the linear goes: each task computes its own rows of the logits and its
loss in token blocks, and keeps only the gradient w.r.t. its hidden rows for backward
(`muxc.kernels.lm_head_loss`), instead of the shared ``tokens x vocab`` logits and each task's
log-softmax of its rows staying alive from forward to backward. Same losses and gradients.

Left alone (the notes say so): a head whose logits pass through anything else first (logit
softcapping or scaling, a dtype cast, an adapter site on the head), a head feeding anything
besides losses, a trained head (a task's own head is a `HeadLoss`, not a `TaskLoss`), and a
linear whose weight is not a frozen tensor. Tied embeddings are fine: the head's weight is a
frozen tensor whichever module owns it.

Does not mutate the input: the rewrite happens on a copy of its graph (nodes and meta copied,
tensors shared) in a new MuxGraph.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from muxc.ir import LMHeadLoss, MuxGraph, NodeInfo, Role, TaskLoss, info, set_info
from muxc.passes.pass_base import CompileContext, PassResult, rewritable_copy

__all__ = ["fuse_lm_head_loss"]

_LINEAR = torch.ops.aten.linear.default


def fuse_lm_head_loss(mux: MuxGraph, ctx: CompileContext) -> PassResult[MuxGraph]:
    """New MuxGraph with frozen-head + TaskLoss pairs fused; does not mutate ``mux``."""
    heads = [n for n in mux.gm.graph.nodes if _fusable(n, mux)]
    losses = sum(1 for n in mux.gm.graph.nodes if isinstance(n.target, TaskLoss))
    if not heads:
        why = ("no TaskLoss reads a frozen linear head directly" if losses
               else "no task's loss reads the shared logits (every task has its own head)")
        return PassResult(mux, f"nothing fused: {why}")
    gm = rewritable_copy(mux)
    g = gm.graph
    fused = 0
    for linear in [n for n in g.nodes if _fusable(n, mux)]:
        hidden, weight, *bias = linear.args
        for user in list(linear.users):
            task = user.target.task
            with g.inserting_before(user):
                new = g.create_node("call_function", LMHeadLoss(task),
                                    (hidden, user.args[1], weight, *bias), name=f"lm_head_{user.name}")
            new.meta.update(user.meta)
            set_info(new, NodeInfo(Role.LOSS, info(user).tasks, sources=info(linear).sources))
            user.replace_all_uses_with(new)
            g.erase_node(user)
            fused += 1
        g.erase_node(linear)
    g.lint()
    gm.recompile()
    return PassResult(replace(mux, gm=gm),
                      f"{fused} task losses fused with the frozen LM head (blocked, no "
                      f"tokens x vocab logits kept for backward); {losses - fused} left as they were")


def _fusable(node: fx.Node, mux: MuxGraph) -> bool:
    """A backbone linear of frozen tensors whose every user is a TaskLoss reading it as logits."""
    if node.op != "call_function" or node.target is not _LINEAR or info(node).role is not Role.BACKBONE:
        return False
    if len(node.args) not in (2, 3) or node.kwargs or not node.users:
        return False
    if not all(isinstance(u.target, TaskLoss) and u.args[0] is node and node not in u.args[1:]
               for u in node.users):
        return False
    return all(_frozen(a, mux) for a in node.args[1:] if a is not None)


def _frozen(arg, mux: MuxGraph) -> bool:
    if not isinstance(arg, fx.Node) or arg.op != "placeholder" or arg.name not in mux.tensors:
        return False
    return not mux.tensors[arg.name].requires_grad
