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

How `muxc.kernels.ia3` declares its pair (``multi_ia3`` and ``multi_ia3_bwd`` must then be
registered in the kernel registry):

>>> op = define_segmented_op(
...     "multi_ia3",
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from muxc.errors import MuxcInternalError
from muxc.kernels import registry
from muxc.kernels.segments import Segments

__all__ = ["SegmentedOp", "define_segmented_op", "segments_for"]


@lru_cache(maxsize=256)
def segments_for(lens: tuple[int, ...]) -> Segments:
    """The shared `Segments` for ``lens`` (metadata cached on it is built once, reused by every
    layer and every step with this layout)."""
    return Segments.of(lens)


def _names(schema: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(argument names, argument types) of a schema written without the op name."""
    parsed = torch._C.parse_schema(f"muxc::_probe{schema}")
    return tuple(a.name for a in parsed.arguments), tuple(str(a.type) for a in parsed.arguments)


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

    def __call__(self, *args):
        """Run the forward op (autograd-aware) on positional arguments in schema order."""
        return getattr(torch.ops.muxc, self.name)(*args)


def _dispatcher(op: str, seg_pos: int) -> Callable:
    """The body of a custom op: choose the implementation (cached) and call it."""

    def run(*args):
        *args, impl = args
        args[seg_pos] = segments_for(tuple(args[seg_pos]))
        choice = registry.select(op, impl, args[0])
        return choice.fn(*args)

    run.__name__ = op
    return run


def _flat_tensors(values) -> tuple[list, list]:
    """Tensors to save (lists flattened) and, per value, how to rebuild it from them."""
    saved, layout = [], []
    for v in values:
        if isinstance(v, torch.Tensor) or v is None:
            layout.append(("one", len(saved)))
            saved.append(v)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            layout.append(("many", len(saved), len(v)))
            saved.extend(v)
        else:
            layout.append(("value", v))
    return saved, layout


def _rebuild(layout, saved) -> list:
    out = []
    for entry in layout:
        if entry[0] == "one":
            out.append(saved[entry[1]])
        elif entry[0] == "many":
            out.append(list(saved[entry[1] : entry[1] + entry[2]]))
        else:
            out.append(entry[1])
    return out


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
    inputs, types = _names(schema)
    bwd_names, _ = _names(bwd_schema)
    if inputs[-1] != "impl" or bwd_names[-1] != "impl" or bwd_names[0] != "grad":
        raise MuxcInternalError(f"{name}: schemas must end with 'impl'; the backward starts with 'grad'")
    bwd_inputs = bwd_names[1:]
    unknown = [n for n in (*bwd_inputs, *grads, *passthrough) if n not in inputs]
    if unknown:
        raise MuxcInternalError(f"{name}: {unknown} are not forward arguments {list(inputs)}")
    seg_pos = inputs.index("seg_lens")
    fwd_op = torch.library.custom_op(
        f"muxc::{name}", _dispatcher(name, seg_pos), mutates_args=(), schema=schema
    )
    bwd_op = torch.library.custom_op(
        f"muxc::{name}_bwd", _dispatcher(f"{name}_bwd", bwd_names.index("seg_lens")),
        mutates_args=(), schema=bwd_schema,
    )
    fwd_op.register_fake(fake)
    grad_pos = [inputs.index(g) for g in grads]
    from_bwd = [inputs.index(n) for n in bwd_inputs]
    list_args = {i for i, t in enumerate(types) if t.startswith("List[Tensor]")}

    def bwd_fake(grad, *args):
        outs = []
        for i in grad_pos:
            arg = args[bwd_inputs.index(inputs[i])]
            outs.append([torch.empty_like(t) for t in arg] if i in list_args
                        else torch.empty_like(arg))
        return tuple(outs)

    bwd_op.register_fake(bwd_fake)
    through = [inputs.index(n) for n in passthrough]

    def setup_context(ctx, inputs, output):
        saved, ctx.layout = _flat_tensors([inputs[i] for i in from_bwd])
        ctx.save_for_backward(*saved)
        ctx.through = [inputs[i] is not None for i in through]

    def backward(ctx, grad):
        grad = grad.contiguous()
        outs = getattr(torch.ops.muxc, f"{name}_bwd")(grad, *_rebuild(ctx.layout, ctx.saved_tensors))
        if len(grad_pos) == 1:
            outs = (outs,)
        result: list = [None] * len(inputs)
        for i, g in zip(grad_pos, outs):
            result[i] = list(g) if i in list_args else g
        for i, given in zip(through, ctx.through):
            result[i] = grad if given else None
        return tuple(result)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return SegmentedOp(name=name, inputs=inputs, bwd_inputs=bwd_inputs, grads=tuple(grads),
                       passthrough=tuple(passthrough))
