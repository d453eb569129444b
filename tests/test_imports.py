"""The import rules that keep muxc's layers apart, and no import cycles inside muxc/.

Data flows frontends -> passes -> plan -> runtime, and imports point the same way: `muxc.ir`
depends on nothing else of muxc; passes and runtime never import each other; the planner never
imports the runtime or the passes; the runtime runs the plan it is handed (it never imports
the planner); kernels stand alone; the adapter-kind table (`muxc.kinds`) sits on ir and
kernels, below everything that asks it. Parsed from the source, so lazy imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "muxc"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every muxc module ``path`` imports (top-level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("muxc")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("muxc"):
                out.add(node.module)
    return out


MODULES = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "muxc"


# layer -> layers it must never import
FORBIDDEN = {
    "ir": {l for l in {_layer(m) for m in MODULES}} - {"ir", "errors"},
    "kernels": {"ir", "kinds", "frontends", "passes", "plan", "runtime", "api", "pipeline", "dump",
                "explain"},
    "kinds": {"frontends", "passes", "plan", "runtime", "api", "pipeline", "dump", "explain"},
    "frontends": {"passes", "plan", "runtime", "api", "pipeline", "dump", "explain"},
    "passes": {"runtime", "api", "dump", "explain"},
    "plan": {"runtime", "passes", "frontends", "api", "dump", "explain"},
    "runtime": {"passes", "plan", "frontends", "api", "dump", "explain"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer):
    bad = sorted(
        f"{m} imports {i}"
        for m, imps in MODULES.items()
        if _layer(m) == layer
        for i in imps
        if _layer(i) in FORBIDDEN[layer]
    )
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = nx.DiGraph()
    for m, imps in MODULES.items():
        g.add_node(m)
        for i in imps:
            if i != m and not m.startswith(i + "."):  # a submodule naming its own package
                g.add_edge(m, i)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"{len(cycles)} import cycles, e.g. {cycles[:3]}"


def test_rules_see_the_tree():
    assert {"ir", "passes", "plan", "runtime", "kernels", "frontends"} <= {_layer(m) for m in MODULES}
    assert "muxc.ir.graph" in MODULES and MODULES["muxc.api"]
    assert not any(m.startswith("muxc.bench") for m in MODULES), "benchmarks live in bench/"
