"""Text dumps of IRs: fixed-width tables, one file per pass.

`graph_table(gm)` is ``print_tabular`` with muxc's columns (role, owning tasks, site, shape).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from muxc.ir import META_KEY, MuxGraph, TaskGraph
from muxc.names import safe_child
from muxc.partition_ir import PartitionedGraph
from muxc.task import Task

__all__ = ["graph_table", "render", "dump_history", "dump_plan", "table"]


def table(headers: list[str], rows: list[list], max_width: int = 60) -> str:
    """A fixed-width text table."""
    cells = [[str(c) if len(str(c)) <= max_width else str(c)[: max_width - 1] + "…" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str) or hasattr(t, "records") or hasattr(t, "task"):
        return str(t) if isinstance(t, str) else repr(t)
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", repr(t))


def _shape(node: fx.Node) -> str:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    return ""


def graph_table(gm: fx.GraphModule) -> str:
    """One row per node: name, op, target, muxc role, owning tasks, site, shape."""
    rows = []
    for n in gm.graph.nodes:
        rec = n.meta.get(META_KEY)
        role = rec.role.value if rec else "?"
        tasks = ",".join(sorted(rec.tasks)) if rec else ""
        site = (rec.site or rec.fqn or "") if rec else ""
        args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in n.args)
        rows.append([n.name, n.op, _target(n), role, tasks, site, _shape(n), args])
    return table(["name", "op", "target", "role", "tasks", "site/tensor", "shape", "args"], rows)


def render(value) -> str:
    """Long text form of any pass output."""
    if isinstance(value, MuxGraph):
        return f"{value!r}\n\n{graph_table(value.gm)}"
    if isinstance(value, PartitionedGraph):
        return f"{value!r}\n\n{value.table()}"
    if isinstance(value, TaskGraph):
        return f"{value!r}\n\n{graph_table(value.gm)}"
    if isinstance(value, list) and value and isinstance(value[0], TaskGraph):
        return "\n\n".join(render(v) for v in value)
    if isinstance(value, list) and value and isinstance(value[0], Task):
        rows = [[t.name, type(t.model).__name__, t.adapter_name or "(active)", type(t.optimizer).__name__ if t.optimizer else f"AdamW(lr={t.lr})"] for t in value]
        return table(["task", "model", "adapter", "optimizer"], rows)
    if hasattr(value, "choices"):
        return table(["op", "impl", "why"], [[op, impl, why] for op, (impl, why) in value.choices.items()], 120)
    return repr(value)


def dump_history(history, directory: Path) -> list[Path]:
    """Write ``pass_NN_<name>.txt`` for every pass record; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in history:
        p = safe_child(directory, f"pass_{rec.index:02d}_{rec.name}.txt")
        p.write_text(f"# pass {rec.index}: {rec.name} ({rec.seconds * 1e3:.1f} ms)\n# {rec.summary}\n\n{render(rec.output)}\n")
        paths.append(p)
    return paths


def dump_plan(plan, directory: Path) -> list[Path]:
    """``schedule.txt`` and ``schedule_gantt.png`` for a `StepPlan`; returns the paths written.

    The PNG is skipped (with a note in ``schedule.txt``) when matplotlib is missing.
    """
    from muxc.schedule import GanttUnavailableError, gantt_png, gantt_text

    directory.mkdir(parents=True, exist_ok=True)
    txt = safe_child(directory, "schedule.txt")
    png = safe_child(directory, "schedule_gantt.png")
    parts = [
        f"# step plan: hTasks {plan.htasks}, stages {plan.stages}, chunk_size {plan.chunk_size}, "
        f"policy {plan.schedule.policy}",
        f"# predicted {plan.predicted_step_ms:.3f} ms, bubble fraction {plan.bubble_fraction:.4f}, "
        f"ineffective tokens {plan.ineffective_token_fraction:.4f}",
        "",
        plan.schedule.table(deps=False),
        "",
        plan.sim.table(),
        "",
        gantt_text(plan.schedule, plan.sim),
    ]
    written = [txt]
    try:
        gantt_png(plan.schedule, plan.sim, png, title=f"hTasks {plan.htasks}", time_unit="s")
        written.append(png)
    except GanttUnavailableError as e:
        parts.append(f"\n(no PNG: {e})")
    txt.write_text("\n".join(parts) + "\n")
    return written
