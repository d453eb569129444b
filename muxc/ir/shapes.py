"""Sizes of a `MuxGraph`'s values: symbolic in the step's batch rows and sequence, or at a hint.

torch.export records each value's shape in ``node.meta["val"]`` with its own symbols
(``s72``, ``s53``...). `GraphShapes` names them: the first dim of every 2-D user input is the
step's batch rows ``B`` and the second its sequence length ``S`` (the first input to use a
symbol decides what it means), so a size becomes a sympy expression in ``B`` and ``S``.
`GraphShapes.at` evaluates sizes at a `ShapeHint` (any other symbol counts as 1).

>>> shapes = GraphShapes(mux)                                   # doctest: +SKIP
>>> shapes.numel(meta_val(linear_node))                         # doctest: +SKIP
32*b*s
>>> shapes.at(ShapeHint(rows=4, seq=256)).numel(meta_val(linear_node))   # doctest: +SKIP
32768
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from muxc.ir.graph import MuxGraph, Role, info
from muxc.ir.partition import ShapeHint

__all__ = ["B", "S", "GraphShapes", "SizesAt", "meta_val", "same_sizes"]

B, S = sympy.symbols("b s", positive=True, integer=True)


def meta_val(node) -> object | None:
    """The exported value of ``node`` (a fake tensor, a tuple of them, a SymInt...), if any."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def same_sizes(first: tuple, *others: tuple) -> bool:
    """Are the size tuples equal? Symbolic sizes are compared by expression: ``==`` on SymInts
    would add a guard to their shape environment."""
    return all(len(o) == len(first) and all(str(x) == str(y) for x, y in zip(o, first))
               for o in others)


class GraphShapes:
    """A `MuxGraph`'s symbolic sizes as expressions in ``B`` (rows) and ``S`` (sequence).

    ``symbols`` maps each exported symbol of a user input's dims to ``B`` or ``S``;
    ``dynamic`` is False when the graph was exported with a static batch or sequence.
    """

    def __init__(self, mux: MuxGraph):
        self.symbols: dict[sympy.Symbol, sympy.Symbol] = {}
        for node in mux.gm.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if info(node).role is Role.INPUT and isinstance(val, torch.Tensor) and val.dim() == 2:
                for d, sym in zip(val.shape, (B, S)):
                    if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                        self.symbols.setdefault(d.node.expr, sym)

    @property
    def dynamic(self) -> bool:
        """Do the user inputs have both a symbolic batch and a symbolic sequence dim?"""
        return set(self.symbols.values()) == {B, S}

    def expr(self, d) -> sympy.Expr:
        """One dim (an int or a SymInt) as an expression in ``B`` and ``S``."""
        if not isinstance(d, torch.SymInt):
            return sympy.Integer(int(d))
        e = d.node.expr
        if not isinstance(e, sympy.Basic):
            return sympy.Integer(int(e))
        return e.xreplace(self.symbols)

    def numel(self, val: torch.Tensor, effective: bool = False) -> sympy.Expr:
        """Elements of ``val``; ``effective`` skips broadcast (stride-0) dims."""
        e = sympy.Integer(1)
        strides = val.stride() if effective else (None,) * val.dim()
        for d, st in zip(val.shape, strides):
            if effective and isinstance(st, int) and st == 0:
                continue
            e = e * self.expr(d)
        return e

    def at(self, hint: ShapeHint) -> SizesAt:
        """These sizes evaluated at ``hint`` (``B`` = rows, ``S`` = seq, other symbols 1)."""
        return SizesAt(self, hint)


class SizesAt:
    """Sizes in elements and bytes at one `ShapeHint`.

    With ``mux`` a compiled program's graph (not run as a doctest):

    >>> sizes = GraphShapes(mux).at(ShapeHint(rows=4, seq=256))    # doctest: +SKIP
    >>> sizes.nbytes(meta_val(linear_node))  # float32 (4, 256, 32)  # doctest: +SKIP
    131072
    """

    def __init__(self, shapes: GraphShapes, hint: ShapeHint):
        self.hint = hint
        value = {B: sympy.Integer(hint.rows), S: sympy.Integer(hint.seq)}
        self.subs = {sym: value[role] for sym, role in shapes.symbols.items()}

    def dim(self, d) -> int:
        if not isinstance(d, torch.SymInt):
            return int(d)
        expr = d.node.expr
        if not isinstance(expr, sympy.Basic):
            return int(expr)
        expr = expr.xreplace(self.subs)
        if expr.free_symbols:
            expr = expr.xreplace(dict.fromkeys(expr.free_symbols, sympy.Integer(1)))
        return int(expr)

    def numel(self, val) -> int:
        """Elements of a tensor, summed over a tuple/list of them; 0 for anything else."""
        if isinstance(val, torch.Tensor):
            n = 1
            for d in val.shape:
                n *= self.dim(d)
            return n
        if isinstance(val, (tuple, list)):
            return sum(self.numel(v) for v in val)
        return 0

    def nbytes(self, val) -> int:
        """Bytes of a tensor (or a tuple/list of them); 8 for a scalar, 0 for anything else."""
        if isinstance(val, torch.Tensor):
            return self.numel(val) * val.dtype.itemsize
        if isinstance(val, (tuple, list)):
            return sum(self.nbytes(v) for v in val)
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            return 8
        return 0
