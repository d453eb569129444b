"""Graphviz pictures of a partitioned graph.

`partitioned_dot(pg)` returns dot text: one cluster per pipeline stage, one box per subgraph
coloured by kind (COMPUTE blue, PEFT orange, COMMUNICATE purple, between the clusters), and
edges between subgraphs labelled with the values that flow along them. Producing the text or
writing a ``.dot`` file needs nothing installed; `render` runs Graphviz's ``dot`` and raises
`GraphvizNotFoundError` with an install hint when it is missing.

With ``pg = program.partitioned`` of a compiled program (not run as a doctest: it needs one;
tests/test_partition.py does):

>>> text = partitioned_dot(pg)                       # doctest: +SKIP
>>> text.splitlines()[0]                             # doctest: +SKIP
'digraph partitioned {'
>>> render(pg, "out/partition.png")                  # doctest: +SKIP
PosixPath('out/partition.png')
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from muxc.errors import MuxcError
from muxc.ir.partition import PartitionedGraph, Subgraph, SubgraphKind

__all__ = [
    "partitioned_dot", "write_dot", "render", "GraphvizNotFoundError", "GraphvizError", "KIND_COLORS",
]

KIND_COLORS = {
    SubgraphKind.COMPUTE: "#cfe2f3",
    SubgraphKind.PEFT: "#f9cb9c",
    SubgraphKind.COMMUNICATE: "#d9d2e9",
}
_SHAPES = {SubgraphKind.COMPUTE: "box", SubgraphKind.PEFT: "box", SubgraphKind.COMMUNICATE: "cds"}
_MAX_NAMES = 3  # value names shown on one edge before "+N more"


class GraphvizNotFoundError(MuxcError):
    """Graphviz's ``dot`` program is not installed (only needed to render pictures)."""


class GraphvizError(MuxcError):
    """``dot`` ran but failed on the text muxc gave it."""


def _q(text: str) -> str:
    """A dot double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(sg: Subgraph, cost_name: str) -> str:
    head = f"#{sg.id} {sg.kind.value.upper()}"
    tasks = ",".join(sorted(sg.tasks))
    if sg.kind is SubgraphKind.COMMUNICATE:
        names = [c.name for c in sg.crossing]
        return (f"{head} {sg.stage}->{sg.dst_stage}\n"
                f"{len(names)} tensors, {sg.bytes_per_token:.4g} B/token\n{_edge_label(tuple(names))}")
    body = sg.site if sg.kind is SubgraphKind.PEFT else sg.describe()
    return f"{head}\n{body}\n{len(sg.nodes)} ops, {sg.cost:.3g} {cost_name}\ntasks {tasks}"


def _edge_label(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" +{len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def partitioned_dot(pg: PartitionedGraph) -> str:
    """Graphviz dot text of ``pg`` (see module doc); deterministic for a given partition."""
    lines = [
        "digraph partitioned {",
        "  rankdir=TB;",
        '  node [fontname="Helvetica", fontsize=10, style=filled];',
        '  edge [fontname="Helvetica", fontsize=8];',
        f"  label={_q(repr(pg))}; labelloc=t;",
    ]

    def box(sg: Subgraph) -> str:
        return (f"sg{sg.id} [label={_q(_label(sg, pg.cost_name))}, shape={_SHAPES[sg.kind]}, "
                f"fillcolor={_q(KIND_COLORS[sg.kind])}];")

    for stage in pg.stages:
        lines.append(f"  subgraph cluster_stage_{stage.index} {{")
        lines.append(f"    label={_q(f'stage {stage.index}: cost {stage.cost:.3g} {pg.cost_name}')};")
        lines.append('    style=rounded; color="#888888";')
        for i in stage.subgraphs:
            sg = pg.subgraphs[i]
            if sg.kind is not SubgraphKind.COMMUNICATE:
                lines.append(f"    {box(sg)}")
        lines.append("  }")
    for sg in pg.boundaries():
        lines.append(f"  {box(sg)}")
    for (a, b), names in pg.edges().items():
        lines.append(f"  sg{a} -> sg{b} [label={_q(_edge_label(names))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(pg: PartitionedGraph, path: str | Path) -> Path:
    """Write `partitioned_dot` to ``path`` (creating its folder); needs no Graphviz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(partitioned_dot(pg))
    return path


def render(pg: PartitionedGraph, path: str | Path, fmt: str | None = None, dot: str = "dot") -> Path:
    """Render ``pg`` with Graphviz to ``path`` (format from its suffix, e.g. ``.png``, ``.svg``).

    Writes ``path`` with suffix ``.dot`` next to it first. Raises `GraphvizNotFoundError` when
    the ``dot`` program is not on PATH and `GraphvizError` when it fails.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "png"
    if fmt == "dot":
        return write_dot(pg, path)
    exe = shutil.which(dot)
    if exe is None:
        raise GraphvizNotFoundError(
            f"cannot render {path}: Graphviz's {dot!r} program is not on PATH; install Graphviz "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz), or use "
            "write_dot() and open the .dot file in any Graphviz viewer"
        )
    src = write_dot(pg, path.with_suffix(".dot"))
    proc = subprocess.run([exe, f"-T{fmt}", str(src), "-o", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GraphvizError(
            f"{dot} -T{fmt} {src} failed ({proc.returncode}): {proc.stderr.strip()[:500]}"
        )
    return path
