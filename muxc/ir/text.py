"""Fixed-width text tables: the long text form every IR and report prints with.

>>> print(table(["op", "n"], [["mm", 3], ["add", 12]]))
op   n 
---  --
mm   3 
add  12
"""

from __future__ import annotations

__all__ = ["table"]


def table(headers: list[str], rows: list[list], max_width: int = 60) -> str:
    """A fixed-width text table (cells longer than ``max_width`` are cut with an ellipsis)."""
    cells = [[str(c) if len(str(c)) <= max_width else str(c)[: max_width - 1] + "…" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)
