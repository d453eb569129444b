"""`AdapterKindSpec`: everything muxc knows about one adapter kind, in one record.

Each PEFT method muxc supports is one entry (`muxc.kinds.lora`, `muxc.kinds.ia3`): the PEFT
layer it reads and how its config becomes `AdapterRecord`s, the single-task custom op that
keeps it one node while tracing (and which of that op's arguments are what), how a multi-task
site applies it (its kernel op), and what the cost model charges for it. Frontends, passes,
plan and runtime ask this table instead of switching on the kind; adding a kind is one new
entry plus its kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from muxc.ir import AdapterKind, AdapterRecord

__all__ = ["AdapterKindSpec"]


@dataclass(frozen=True)
class AdapterKindSpec:
    """One adapter kind (see module doc). Callables take plain values, never graph nodes."""

    kind: AdapterKind
    peft_type: str  # PeftConfig.peft_type value ("LORA")
    # PEFT layer classes holding this kind, or their qualified names (classes not imported)
    peft_layers: tuple[type | str, ...]
    config_problems: Callable[[object], list[str]]  # PeftConfig -> options muxc cannot run
    holds: Callable[[torch.nn.Module, str], bool]  # (layer, adapter) -> does it hold the adapter
    records: Callable[[str, str, torch.nn.Module, str], AdapterRecord]  # (task, path, layer, adapter)
    traced_forward: Callable[[str, str], Callable]  # (site, adapter) -> forward routing the trace op
    # the single-task trace op and its argument layout: the base tensor the adapter node stands
    # in for, the extra tensor it reads (LoRA: x), and the slice holding the adapter's params
    trace_op: torch._ops.OpOverload
    adapted_arg: int
    input_arg: int | None
    param_args: tuple[int, int]
    # multi-task execution: the kernel registry's op name, and how a site applies every task's
    # adapter of this kind: (site, x, t, mux, params by task, records by task) -> new t
    kernel_op: str
    apply: Callable[..., torch.Tensor]
    # cost model: the op kind name (`muxc.plan.OpKind` value), and for an adapter on a base op
    # with input width k, output width n, rank r, reading the op's input (pre) or output: its
    # cost-key dims, forward FLOPs per token, and trainable numel
    cost_op: str
    cost_dims: Callable[[int, int, int, bool], tuple[int, ...]]
    flops_per_token: Callable[[int, int, int, bool], float]
    numel: Callable[[int, int, int, bool], int]
    adds_to_output: bool  # the site adds a delta to the base output (an extra elementwise add)
    # kinds sharing a PEFT type (LoRA, DoRA) tell their configs apart: does ``cfg`` use this kind
    for_config: Callable[[object], bool] = lambda cfg: True
    # frozen backbone tensors the trace op reads (DoRA: the base weight and bias): their
    # argument indices and the names `apply` receives them under (an argument may be None)
    frozen_args: tuple[int, ...] = ()
    frozen_names: tuple[str, ...] = ()
    # work every site call does once per task regardless of tokens (DoRA's weight norm): the
    # (K, N) of a GEMM run over ``rows`` rows, or None; and its forward FLOPs
    per_call_gemm: Callable[[int, int, int, bool], tuple[tuple[int, int], int] | None] = (
        lambda k, n, r, pre: None
    )
    flops_per_call: Callable[[int, int, int, bool], float] = lambda k, n, r, pre: 0.0
    # passes of one elementwise op over the per-call GEMM's (rows, N) result, in tensors of that
    # size read or written (DoRA's weight norm squares and sums it: 3); 0: no such op
    per_call_passes: float = 0.0
    # the per-call GEMMs read off a record's own parameters, ``[((K, N), rows), ...]``, when
    # the site's sizes do not give them (a P-tuning encoder's widths); None: `per_call_gemm`
    call_gemms: Callable[[AdapterRecord], list[tuple[tuple[int, int], int]]] | None = None
    # a task head: its node feeds the task's loss (`muxc.ir.HeadLoss`) instead of a site
    is_head: bool = False
    # its parameters are the base model's own tensors (a trained bias), which the frozen op
    # also reads: they are never shared across tasks nor tagged as adapter parameters there
    trains_base: bool = False
    # it leaves a node in the task's trace (False: prefix tuning, which no base layer holds;
    # its parameters reach the merged graph through `muxc.passes.rewrite_attention`)
    traces: bool = True
    # tokens the kind puts in front of each of its task's rows before batches are laid out
    # (prompt tuning: its virtual tokens); 0 for kinds that leave batches as they are
    prepends: Callable[[AdapterRecord], int] = lambda rec: 0

    def param_tensors(self, args: tuple) -> tuple:
        """The adapter-parameter arguments of a trace-op call (a list argument, as a prompt
        encoder's parameters, flattened)."""
        lo, hi = self.param_args
        out = []
        for a in args[lo:hi]:
            out.extend(a) if isinstance(a, (list, tuple)) else out.append(a)
        return tuple(out)

    def with_params(self, args: tuple, params: tuple) -> tuple:
        """``args`` of a trace-op call with its adapter parameters replaced by ``params`` (in
        `param_tensors` order without the absent ones; list arguments kept lists, an absent
        parameter (None, a head without bias) kept None)."""
        lo, hi = self.param_args
        it = iter(params)

        def put(a):
            if isinstance(a, (list, tuple)):
                return [next(it) for _ in a]
            return None if a is None else next(it)

        return (*args[:lo], *(put(a) for a in args[lo:hi]), *args[hi:])

    def frozen_tensors(self, args: tuple) -> tuple:
        """The frozen-backbone arguments of a trace-op call (None where absent)."""
        return tuple(args[i] for i in self.frozen_args)
