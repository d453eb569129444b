"""Adapter inputs computed again in backward from tensors the backward keeps anyway.

A LoRA or IA3 kernel keeps its input ``x`` for the adapter's weight gradient. In a decoder
layer that input is usually the output of a cheap op whose own backward already keeps what
made it: the norm's output ``w * (h * rsqrt(var))`` (its ``mul`` keeps ``h`` and the per-row
``rsqrt``), a gated MLP's ``silu(gate) * up`` (`muxc.kernels.swiglu` keeps ``gate`` and
``up``), GPT-2's ``gelu`` product. Keeping ``x`` as well stores the same information twice:
on a Llama with LoRA on every linear, the norm outputs and the MLP product are a third of
what a layer saves.

`Replay` is the merged graph's identity node between such an ``x`` and the adapter sites that
read it (pass `muxc.passes.replay_adapter_inputs`). At run time it gives ``x`` a `Recipe`:
the ops from its ``roots`` (tensors the producing ops keep for backward, and frozen weights)
to ``x``. A kernel that would keep ``x`` keeps the roots instead (`kept_form`), and its
backward runs the recipe (`Recipe.compute`): the same ATen ops on the same tensors, so the
values are bit for bit those of the forward. A root costs no memory: the op that keeps it
keeps it longer (its backward comes after the adapter's). So the recipe is given only when
every activation root requires a gradient (then its op keeps it); otherwise, and under any
tracing, ``x`` is kept as before.

Several sites read one ``x`` (a norm's output feeds the q, k and v adapters): the first of
their backwards to run computes it, the others reuse that value, and the last drops it (each
site that keeps the roots counts one pending use). So a `Replay` costs one pass over its ops
per run, not one per site, and the value is alive only between the sites' backwards.

>>> import torch
>>> aten = torch.ops.aten
>>> r = Replay(((aten.mul.Tensor, (Slot(0), Slot(1)), {}),), (True, True), "mul")
>>> a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
>>> x = r(a * b, a, b)
>>> recipe_of(x).roots == (a, b), bool((recipe_of(x).compute(recipe_of(x).roots) == x).all())
(True, True)
>>> recipe = recipe_of(x)
>>> [recipe.keep() == (a, b) for _ in range(2)]  # two sites keep the roots
[True, True]
>>> first = recipe.compute(recipe.roots)  # the first backward replays, the second reuses
>>> recipe.compute(recipe.roots) is first, recipe.shared.value is None
(True, True)
>>> recipe_of(r(x.detach(), a.detach(), b))  # an activation root without grad: kept as is
>>> Replay(((aten.add.Tensor, (Slot(0),), {"other": Slot(1), "alpha": 2}),), (True, True),
...        "add").run((torch.ones(2), torch.ones(2)))
tensor([3., 3.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx.node import map_aggregate
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["Replay", "Recipe", "Shared", "Slot", "recipe_of", "derive", "kept_form"]

_ATTR = "_muxc_recipe"


class Slot(int):
    """An argument of a replayed op: the value at this index (roots first, then each op's
    result in order)."""

    def __repr__(self) -> str:
        return f"Slot({int(self)})"


def _fill(value, values: list):
    """``value`` (an argument, lists, tuples and dicts walked) with each `Slot` replaced."""
    return map_aggregate(value, lambda v: values[v] if type(v) is Slot else v)


@dataclass(frozen=True, eq=False)
class Replay:
    """Graph target: ``Replay(...)(x, *roots)`` returns ``x``, given a `Recipe` when replaying
    is free (module doc).

    ``steps``: ``(target, args, kwargs)`` per op from the roots to ``x``, arguments as `Slot`s;
    ``activation``: per root, whether it is an activation (must require a gradient) rather than
    a frozen weight; ``label``: the replayed ops, for dumps.
    """

    steps: tuple[tuple[Callable, tuple, dict], ...]
    activation: tuple[bool, ...]
    label: str

    def __post_init__(self) -> None:
        # fx code generation names a call_function target by __name__
        object.__setattr__(self, "__name__", "replay")

    def __call__(self, x, *roots):
        if (
            torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and all(r.requires_grad for r, act in zip(roots, self.activation) if act)
            and _get_current_dispatch_mode() is None
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
        ):
            setattr(x, _ATTR, Recipe(self, tuple(roots)))
        return x

    def run(self, roots) -> torch.Tensor:
        """The steps on ``roots`` (no autograd): ``x``'s value again."""
        values = list(roots)
        with torch.no_grad():
            for target, args, kwargs in self.steps:
                values.append(target(*_fill(args, values), **_fill(kwargs, values)))
        return values[-1]

    def __repr__(self) -> str:
        return f"Replay({self.label})"


class Shared:
    """The value one `Replay` call's steps give, shared by the recipes derived from it:
    ``pending`` backwards still to ask for it (`Recipe.keep`), ``value`` once one has."""

    __slots__ = ("value", "pending")

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.pending = 0


@dataclass(frozen=True, eq=False)
class Recipe:
    """How to compute a tensor again: `Replay` steps on ``roots``, then ``post`` (views and
    casts a kernel wrapper applied, `derive`); ``shared`` with every recipe derived from the
    same `Replay` call."""

    replay: Replay
    roots: tuple[torch.Tensor, ...]
    post: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    shared: Shared = field(default_factory=Shared)

    def keep(self) -> tuple[torch.Tensor, ...]:
        """The roots, for a backward that will `compute` the tensor once (counted)."""
        self.shared.pending += 1
        return self.roots

    def compute(self, roots) -> torch.Tensor:
        """The tensor, from ``roots`` (this recipe's, or what backward unpacked of them): the
        replayed value another site's backward computed while it is still pending, else the
        steps run again."""
        shared = self.shared
        value = shared.value if shared.value is not None else self.replay.run(roots)
        shared.pending = max(shared.pending - 1, 0)
        shared.value = value if shared.pending else None  # the last pending use drops it
        with torch.no_grad():
            for fn in self.post:
                value = fn(value)
        return value


def recipe_of(t) -> Recipe | None:
    """The `Recipe` a `Replay` node gave ``t`` (None: none)."""
    return getattr(t, _ATTR, None)


def derive(src: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(src)`` (a view or cast of ``src``), given ``src``'s recipe extended by ``fn`` when
    ``src`` has one and ``fn`` made a new tensor."""
    dst = fn(src)
    recipe = recipe_of(src)
    if recipe is not None and dst is not src:
        setattr(dst, _ATTR, Recipe(recipe.replay, recipe.roots, (*recipe.post, fn), recipe.shared))
    return dst


def kept_form(t) -> tuple[Recipe | None, tuple]:
    """What a backward keeps of ``t``: ``(recipe, roots)`` when ``t`` has a recipe (counted as
    a pending use, `Recipe.keep`), else ``(None, (t,))``."""
    recipe = recipe_of(t)
    if recipe is None:
        return None, (t,)
    return recipe, recipe.keep()
