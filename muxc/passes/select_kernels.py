"""Pass `select_kernels`: decide which implementation serves each adapter op kind, and why.

Asks the kernel registry with a tensor like the program's activations (device, dtype), under
the user's ``kernel_impl`` option. A forced implementation that cannot run raises here, at
compile time, not at the first step. Does not mutate the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muxc.ir import MuxGraph
from muxc.kernels import registry
from muxc.kinds import spec_of
from muxc.passes.pass_base import CompileContext, PassResult

__all__ = ["select_kernels", "KernelPlan"]

@dataclass(frozen=True)
class KernelPlan:
    """Op kind -> (implementation, reason) for the kinds this program uses."""

    choices: dict[str, tuple[str, str]]

    def __repr__(self) -> str:
        body = ", ".join(f"{op}={impl}" for op, (impl, _) in self.choices.items())
        return f"KernelPlan({body})"


def select_kernels(mux: MuxGraph, ctx: CompileContext) -> PassResult[KernelPlan]:
    """Record the registry's choice for every adapter op kind in ``mux``; does not mutate it."""
    kinds = {r.kind for recs in mux.sites.values() for r in recs}
    choices = {}
    for kind in sorted(kinds, key=lambda k: k.value):
        op = spec_of(kind).kernel_op
        if not op:  # a kind that runs in torch ops only (a trained bias: one add)
            continue
        probe = next(p for recs in mux.sites.values() for r in recs if r.kind is kind for p in r.params.values())
        like = torch.empty(0, device=probe.device, dtype=probe.dtype)
        for name in (op, f"{op}_bwd"):
            choice = registry.select(name, ctx.options.kernel_impl, like)
            choices[name] = (choice.impl.value, choice.reason)
    return PassResult(KernelPlan(choices))
