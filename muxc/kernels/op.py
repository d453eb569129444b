"""The custom-op plumbing every multi-task kernel family shares.

A family (LoRA, IA3) is two ``torch.library`` custom ops, ``muxc::<name>`` and
``muxc::<name>_bwd``, each dispatching through the kernel registry, tied together by
``register_autograd``. `define_segmented_op` writes all of it from two schemas and a fake
(shape) rule for the forward; the registered implementations do the math.

Conventions (what makes the plumbing generic):

* the forward schema's last argument is ``str? impl`` (None: the registry chooses); an argument
  named ``seg_lens`` reaches the implementations as a `Segments` (shared per step);
* the implementation of ``<name>`` is called with the forward arguments minus ``impl``, that
  of ``<name>_bwd`` with ``grad`` followed by the forward arguments its schema names, so a
  backward never saves what it does not read;
* ``<name>_bwd`` returns one gradient (a tensor, or a list for a ``Tensor[]`` argument) per
  name in ``grads``, in that order; forward arguments in ``passthrough`` (e.g. a base output
  the op adds to) get the incoming gradient unchanged; the rest get None.

Eager calls skip the custom-op machinery. Calling a custom op with autograd costs ~160 us of
Python per call here (~50 us without grad), against ~14 us for an `autograd.Function`: at
hundreds of adapter sites per step that overhead exceeds the adapters' own compute on CPU.
So `SegmentedOp.__call__` runs the same implementations, saving the same tensors, through an
`autograd.Function` when it sees plain tensors outside any tracing (no compile, no dispatch
mode, no functorch transform), and the custom op otherwise, so `torch.export`, `torch.compile`
and fake tensors still see one opaque ``muxc::<name>`` node with its fake rule.

Declaring a pair, as `muxc.kernels.ia3` does for ``multi_ia3`` (implementations of
``example_scale`` and ``example_scale_bwd`` must then be registered in the kernel registry):

>>> op = define_segmented_op(
...     "example_scale",
...     schema="(Tensor h, int[] seg_lens, Tensor[] vectors, str? impl) -> Tensor",
...     bwd_schema="(Tensor grad, Tensor h, int[] seg_lens, Tensor[] vectors, str? impl)"
...                " -> (Tensor, Tensor[])",
...     fake=lambda h, seg_lens, vectors, impl: torch.empty_like(h),
...     grads=("h", "vectors"),
... )
>>> op.bwd_inputs
('h', 'seg_lens', 'vectors', 'impl')
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from muxc.errors import MuxcInternalError
from muxc.kernels import registry
from muxc.kernels.replay import kept_form, recipe_of
from muxc.kernels.segments import Segments

__all__ = ["SegmentedOp", "define_segmented_op", "segments_for", "eager_calls"]


@lru_cache(maxsize=256)
def segments_for(lens: tuple[int, ...]) -> Segments:
    """The shared `Segments` for ``lens`` (metadata cached on it is built once, reused by every
    layer and every step with this layout)."""
    return Segments.of(lens)


def _schema(schema: str) -> tuple[tuple[str, ...], frozenset[int]]:
    """(argument names, positions of ``Tensor[]`` arguments) of a schema without op name."""
    parsed = torch._C.parse_schema(f"muxc::_probe{schema}")
    names = tuple(a.name for a in parsed.arguments)
    lists = frozenset(i for i, a in enumerate(parsed.arguments)
                      if str(a.type).startswith("List[Tensor]"))
    return names, lists


def _flatten(values) -> tuple[list, tuple]:
    """Tensors of ``values`` (lists flattened) and, per value, how to rebuild it from them."""
    flat, layout = [], []
    for v in values:
        if isinstance(v, torch.Tensor) or v is None:
            layout.append(("one", len(flat)))
            flat.append(v)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            layout.append(("many", len(flat), len(v)))
            flat.extend(v)
        else:
            layout.append(("value", v))
    return flat, tuple(layout)


def _rebuild(layout, flat) -> list:
    out = []
    for entry in layout:
        if entry[0] == "one":
            out.append(flat[entry[1]])
        elif entry[0] == "many":
            out.append(list(flat[entry[1] : entry[1] + entry[2]]))
        elif entry[0] == "replay":  # kept as its recipe's roots (`muxc.kernels.replay`)
            out.append(entry[1].compute(flat[entry[2] : entry[2] + entry[3]]))
        else:
            out.append(entry[1])
    return out


def _replayed(flat: list, layout: tuple) -> tuple[list, tuple]:
    """``(flat, layout)`` with each tensor that has a `muxc.kernels.replay.Recipe` kept as the
    recipe's roots (a ``("replay", recipe, start, n)`` entry), for a backward to compute again."""
    if not any(recipe_of(t) is not None for t in flat):
        return flat, layout
    out, entries = [], []
    for entry in layout:
        if entry[0] == "one":
            recipe, kept = kept_form(flat[entry[1]])
            entries.append(("one", len(out)) if recipe is None
                           else ("replay", recipe, len(out), len(kept)))
            out.extend(kept)
        elif entry[0] == "many":
            entries.append(("many", len(out), entry[2]))
            out.extend(flat[entry[1] : entry[1] + entry[2]])
        else:
            entries.append(entry)
    return out, tuple(entries)


def _dispatcher(op: str, seg_pos: int) -> Callable:
    """The body of a custom op: choose the implementation (cached) and call it."""

    def run(*args):
        *args, impl = args
        args[seg_pos] = segments_for(tuple(args[seg_pos]))
        return registry.select(op, impl, args[0]).fn(*args)

    run.__name__ = op
    return run


_EAGER_CALLS = [0]


def _profiled(name: str):
    """A ``muxc::<name>`` profiler range around eager work (as the custom op shows in traces),
    entered only while a profiler runs: the range itself costs several microseconds."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"muxc::{name}")
    return contextlib.nullcontext()


def eager_calls() -> int:
    """Calls served by the eager `autograd.Function` path since import (tests diff it)."""
    return _EAGER_CALLS[0]


@dataclass(frozen=True)
class SegmentedOp:
    """The two ops of a family and how their arguments map onto each other."""

    name: str
    inputs: tuple[str, ...]
    """Forward argument names, ``impl`` last."""
    bwd_inputs: tuple[str, ...]
    """Forward arguments the backward reads (after ``grad``), in its schema's order."""
    grads: tuple[str, ...]
    passthrough: tuple[str, ...]
    lists: frozenset[int] = field(repr=False)
    run: Callable = field(repr=False)
    run_bwd: Callable = field(repr=False)

    def __post_init__(self) -> None:
        # argument positions, looked up once (a step calls the op at every site and layer)
        index = self.inputs.index
        object.__setattr__(self, "_saved_at", tuple(index(n) for n in self.bwd_inputs))
        object.__setattr__(self, "_grads_at", tuple(index(n) for n in self.grads))
        object.__setattr__(self, "_passed_at", tuple(index(n) for n in self.passthrough))

    def __call__(self, *args):
        """Run the forward op (autograd-aware) on positional arguments in schema order."""
        first = args[0]
        if (
            type(first) is not torch.Tensor
            or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()
        ):
            return getattr(torch.ops.muxc, self.name)(*args)
        _EAGER_CALLS[0] += 1
        flat, layout = _flatten(args)
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)):
            with _profiled(self.name):
                return self.run(*args)
        return _Eager.apply(self, layout, *flat)

    # ------------------------------------------------------------------ shared with autograd

    def save(self, args) -> tuple[list, tuple]:
        """What the backward keeps: tensors of the arguments it reads, and their layout; an
        argument with a replay recipe is kept as the recipe's roots (`muxc.kernels.replay`)."""
        return _replayed(*_flatten([args[i] for i in self._saved_at]))

    def backward(self, bwd: Callable, grad, saved_layout, saved, given) -> list:
        """Gradients per forward argument (lists for ``Tensor[]``; None where none), from
        ``bwd`` (`run_bwd` eagerly, the ``_bwd`` custom op when traced)."""
        grad = grad.contiguous()
        outs = bwd(grad, *_rebuild(saved_layout, saved))
        if len(self.grads) == 1:
            outs = (outs,)
        result: list = [None] * len(self.inputs)
        for i, g in zip(self._grads_at, outs):
            result[i] = list(g) if i in self.lists else g
        for i, present in zip(self._passed_at, given):
            result[i] = grad if present else None
        return result


class _Eager(torch.autograd.Function):
    """Eager autograd for a `SegmentedOp`: the custom op's semantics without its overhead.
    Tensors travel flattened (autograd only tracks top-level tensor arguments)."""

    @staticmethod
    def forward(ctx, op: SegmentedOp, layout, *flat):
        args = _rebuild(layout, flat)
        saved, ctx.saved_layout = op.save(args)
        ctx.save_for_backward(*saved)
        ctx.op, ctx.layout = op, layout
        ctx.given = [args[i] is not None for i in op._passed_at]
        with _profiled(op.name):
            return op.run(*args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        op = ctx.op
        with _profiled(f"{op.name}_bwd"):
            per_arg = op.backward(op.run_bwd, grad, ctx.saved_layout, ctx.saved_tensors,
                                  ctx.given)
        flat: list = []
        for entry, g in zip(ctx.layout, per_arg):
            if entry[0] == "one":
                flat.append(g)
            elif entry[0] == "many":
                flat.extend(g if g is not None else [None] * entry[2])
        return (None, None, *flat)


def define_segmented_op(
    name: str,
    *,
    schema: str,
    bwd_schema: str,
    fake: Callable,
    grads: Sequence[str],
    passthrough: Sequence[str] = (),
) -> SegmentedOp:
    """Define ``muxc::<name>`` and ``muxc::<name>_bwd`` (see the module docstring).

    ``fake`` computes the forward's output metadata from the forward arguments (``impl``
    included); the backward's fake is derived: one empty tensor like each ``grads`` input.
    """
    if hasattr(torch.ops.muxc, name):  # torch.library would silently replace it
        raise MuxcInternalError(f"muxc::{name} is already defined")
    inputs, lists = _schema(schema)
    bwd_names, _ = _schema(bwd_schema)
    if inputs[-1] != "impl" or bwd_names[-1] != "impl" or bwd_names[0] != "grad":
        raise MuxcInternalError(
            f"{name}: both schemas must end with 'impl' and the backward's start with 'grad'"
        )
    bwd_inputs = bwd_names[1:]
    unknown = [n for n in (*bwd_inputs, *grads, *passthrough) if n not in inputs]
    if unknown:
        raise MuxcInternalError(f"{name}: {unknown} are not forward arguments {list(inputs)}")
    run = _dispatcher(name, inputs.index("seg_lens"))
    run_bwd = _dispatcher(f"{name}_bwd", bwd_names.index("seg_lens"))
    op = SegmentedOp(name=name, inputs=inputs, bwd_inputs=bwd_inputs, grads=tuple(grads),
                     passthrough=tuple(passthrough), lists=lists, run=run, run_bwd=run_bwd)

    fwd_op = torch.library.custom_op(f"muxc::{name}", run, mutates_args=(), schema=schema)
    bwd_op = torch.library.custom_op(f"muxc::{name}_bwd", run_bwd, mutates_args=(),
                                     schema=bwd_schema)
    fwd_op.register_fake(fake)

    def bwd_fake(grad, *args):
        outs = []
        for g in grads:
            arg = args[bwd_inputs.index(g)]
            outs.append([torch.empty_like(t) for t in arg] if inputs.index(g) in lists
                        else torch.empty_like(arg))
        return outs[0] if len(outs) == 1 else tuple(outs)

    bwd_op.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        saved, ctx.saved_layout = op.save(inputs)
        ctx.save_for_backward(*saved)
        ctx.given = [inputs[op.inputs.index(n)] is not None for n in op.passthrough]

    def backward(ctx, grad):
        bwd = getattr(torch.ops.muxc, f"{name}_bwd")
        return tuple(op.backward(bwd, grad, ctx.saved_layout, ctx.saved_tensors, ctx.given))

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return op
