"""Wire prefix tuning into a merged graph: every attention node becomes a `PrefixAttention`.

A helper of `muxc.passes.rewrite_attention` (alignment "pad"); why this is exact:
`muxc.ir.prefix`. Refuses, with a remedy, what it cannot run exactly: a model family whose
positions after a prefix muxc does not know, and a prefix whose width does not match the
model's attention layers (and, through `refuse_prefix`, which `muxc.api` calls, pipeline stages
on several processes).
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from muxc.errors import MuxcInternalError, UnsupportedPeftError
from muxc.ir import (
    SDPA,
    AdapterKind,
    AdapterRecord,
    MuxGraph,
    PrefixAttention,
    Role,
    info,
)
from muxc.ir.prefix import POSITION_RULES
from muxc.passes.eager_attention import put_in_place, sdpa_from_eager, unmatched_attention
from muxc.passes.pass_base import rewritable_copy

__all__ = ["prefix_records", "with_prefix_attention", "refuse_prefix"]


def prefix_records(mux: MuxGraph) -> tuple[AdapterRecord, ...]:
    """The prefix-tuning records of ``mux``'s tasks, in task order."""
    return tuple(r for t in mux.tasks for r in mux.adapters.get(t, ()) if r.kind is AdapterKind.PREFIX)


def refuse_prefix(recs: tuple[AdapterRecord, ...], what: str, why: str) -> None:
    """Raise `UnsupportedPeftError` for prefix-tuning tasks under option ``what``."""
    if recs:
        tasks = sorted({r.task for r in recs})
        raise UnsupportedPeftError(
            f"task(s) {tasks}: prefix tuning with {what} is not supported yet: {why}; run the "
            "stages in one process (every fusion and alignment works there), or train the "
            "prefix-tuning tasks in a program of their own"
        )


def with_prefix_attention(mux: MuxGraph, recs: tuple[AdapterRecord, ...], chunked: bool = False
                          ) -> tuple[MuxGraph, str]:
    """A new MuxGraph whose attention nodes give ``recs``' tasks their prefix K/V (and a note);
    with ``chunked`` they also attend across chunks (`PrefixAttention`). Does not mutate ``mux``."""
    if mux.model_type not in POSITION_RULES:
        raise UnsupportedPeftError(
            f"task(s) {sorted({r.task for r in recs})}: prefix tuning on {mux.model_type!r} models is "
            f"not supported yet (supported: {sorted(POSITION_RULES)}): muxc must give the prefix "
            "K/V and number the tokens after it exactly as HF does, and is tested to do so only "
            "for those families"
        )
    gm = rewritable_copy(mux)
    g = gm.graph
    eager = sdpa_from_eager(g)
    left = unmatched_attention(g)
    targets = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    if left or not targets:
        raise UnsupportedPeftError(
            f"prefix tuning needs scaled_dot_product_attention or HF's eager attention "
            f"(softmax(q @ k^T * scale + mask) @ v) in the backbone; this {mux.model_type} model "
            "computes attention in another form"
        )
    layers = len(targets)
    for r in recs:
        table = r.params["w2"].shape[0] if "w2" in r.params else r.params["embedding"].shape[1]
        if table % (2 * layers):
            raise UnsupportedPeftError(
                f"task {r.task!r}: its prefix encoder makes {table} values per virtual token, not "
                f"2 (K, V) x {layers} attention layers x token_dim; build its PrefixTuningConfig "
                "for this model (get_peft_model fills num_layers and token_dim from its config)"
            )
    by_name = {}
    for ph in g.find_nodes(op="placeholder"):
        rec = info(ph)
        if rec.role is Role.ADAPTER_PARAM:
            by_name[(next(iter(rec.tasks)), rec.fqn)] = ph
    try:
        params = [by_name[(r.task, r.param_names[role])] for r in recs for role in r.params]
    except KeyError as e:
        raise MuxcInternalError(f"prefix parameter {e} has no placeholder in the merged graph") from e
    mux_input = next(n for n in g.find_nodes(op="placeholder") if n.name == "mux")
    for i, node in enumerate(targets):
        norm = normalize_function(SDPA, tuple(node.args), dict(node.kwargs),
                                  normalize_to_only_use_kwargs=True)
        if norm is None:
            raise MuxcInternalError(f"cannot normalise attention arguments of {node.format_node()}")
        with g.inserting_before(node):
            new = g.create_node("call_function", PrefixAttention(i, layers, recs, chunked),
                                (mux_input, *params), dict(norm.kwargs), name=f"prefix_attention_{i}")
        put_in_place(g, node, new)
    g.lint()
    gm.recompile()
    note = (f"{layers} attention nodes{' (chunk-aware)' if chunked else ''} give "
            f"{len(recs)} prefix-tuning task(s) their K/V")
    if eager:
        note += f" ({eager} from eager attention, rewritten to SDPA first)"
    return replace(mux, gm=gm), note
