"""Text dumps of IRs: fixed-width tables, one file per pass.

`graph_table(gm)` is ``print_tabular`` with muxc's columns (role, owning tasks, site, shape).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx as fx

from muxc.ir import META_KEY, MuxGraph, PartitionedGraph, TaskGraph, table
from muxc.names import safe_child
from muxc.task import Task

__all__ = ["graph_table", "render", "dump_history", "dump_plan", "dump_measured", "table"]


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
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], TaskGraph):
        return _task_graphs(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Task):
        rows = [[t.name, type(t.model).__name__, t.adapter_name or "(active)", type(t.optimizer).__name__ if t.optimizer else f"AdamW(lr={t.lr})"] for t in value]
        return table(["task", "model", "adapter", "optimizer"], rows)
    if hasattr(value, "choices"):
        return table(["op", "impl", "why"], [[op, impl, why] for op, (impl, why) in value.choices.items()], 120)
    if isinstance(value, Mapping):
        rows = [[str(k), str(v)] for k, v in value.items()]
        return f"{value!r}\n\n{table(['key', 'value'], rows)}"
    return repr(value)


def _task_graphs(graphs) -> str:
    """Each export's table once: the first graph of an export (its own, or the first re-binding
    one when its exporter is not among ``graphs``) is tabled, the others point at it."""
    shown: dict[str, str] = {}  # exporting task -> the task whose table shows its rows
    parts = []
    for tg in graphs:
        source = tg.reused_from or tg.task
        if source not in shown:
            shown[source] = tg.task
            parts.append(render(tg))
            continue
        parts.append(
            f"{tg!r}\n\n(the rows of {shown[source]!r}'s table, owned by {tg.task!r}: its "
            f"placeholders bound to {tg.task!r}'s tensors, its adapter nodes reading {tg.task!r}'s "
            "adapter parameters)"
        )
    return "\n\n".join(parts)


def dump_history(history, directory: Path) -> list[Path]:
    """Write ``pass_NN_<name>.txt`` per record (text rendered when its pass ran); returns paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in history:
        p = safe_child(directory, f"pass_{rec.index:02d}_{rec.name}.txt")
        head = f"# pass {rec.index}: {rec.name} ({rec.seconds * 1e3:.1f} ms)\n# {rec.summary}"
        p.write_text(f"{head}\n\n{rec.text}\n")
        paths.append(p)
    return paths


def dump_plan(plan, directory: Path) -> list[Path]:
    """``schedule.txt`` and ``schedule_gantt.png`` for a `StepPlan`; returns the paths written.

    The PNG is skipped (with a note in ``schedule.txt``) when matplotlib is missing.
    """
    from muxc.dump.gantt import GanttUnavailableError, gantt_png, gantt_text

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


def dump_measured(plan, measured, directory: Path) -> list[Path]:
    """``schedule_measured.txt`` (+ ``schedule_measured_gantt.png``): the last step's measured
    timeline beside what the simulator predicted for its plan, per stage."""
    from muxc.dump.gantt import GanttUnavailableError, gantt_png, gantt_text

    directory.mkdir(parents=True, exist_ok=True)
    txt = safe_child(directory, "schedule_measured.txt")
    png = safe_child(directory, "schedule_measured_gantt.png")
    sim = plan.sim
    rows = [[s, f"{sim.busy[s]:.4g}", f"{measured.busy[s]:.4g}", f"{sim.utilisation[s]:.3f}",
             f"{measured.utilisation[s]:.3f}"] for s in range(plan.stages)]
    parts = [
        f"# last step: hTasks {plan.htasks}, stages {plan.stages}, policy {plan.schedule.policy}",
        f"# makespan simulated {sim.makespan * 1e3:.3f} ms, measured {measured.makespan * 1e3:.3f} ms; "
        f"bubble fraction simulated {sim.bubble_fraction:.4f}, measured {measured.bubble_fraction:.4f}",
        "",
        table(["stage", "busy s (simulated)", "busy s (measured)", "utilisation (sim)",
               "utilisation (measured)"], rows),
        "",
        gantt_text(plan.schedule, measured),
    ]
    written = [txt]
    try:
        gantt_png(plan.schedule, measured, png, title=f"measured: hTasks {plan.htasks}", time_unit="s")
        written.append(png)
    except GanttUnavailableError as e:
        parts.append(f"\n(no PNG: {e})")
    txt.write_text("\n".join(parts) + "\n")
    return written
