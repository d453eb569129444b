"""Gantt charts of a simulated schedule: fixed-width text (dumps) and a PNG (matplotlib).

Text: one row per stage; a forward of hTask ``h`` is drawn with ``h``'s letter in upper case
(A, B, ...), a backward in lower case, idle time as ``.``; a box wide enough carries its
micro-batch index.

>>> from muxc.plan.schedule import build_schedule
>>> from muxc.plan.simulate import simulate
>>> s = build_schedule([2, 1], stages=2, policy="interleaved")
>>> print(gantt_text(s, simulate(s, lambda st: 1.0), width=24))
time 0 .. 8 (1 column = 0.3333)
stage 0 |A0 A1 ...a0 B0 a1 ...b0 |
stage 1 |...A0 a0 A1 a1 B0 b0 ...|
legend: A.. = hTask 0.. forward, a.. = backward, digits = micro-batch, . = idle
"""

from __future__ import annotations

import string
from pathlib import Path

from muxc.errors import MuxcError
from muxc.ir.schedule import Schedule, Step
from muxc.ir.schedule import SimResult

__all__ = ["GanttUnavailableError", "gantt_text", "gantt_png"]

_LETTERS = string.ascii_uppercase


class GanttUnavailableError(MuxcError):
    """The PNG Gantt chart needs matplotlib, which is not installed."""


def _letter(step: Step) -> str:
    letter = _LETTERS[step.htask % len(_LETTERS)]
    return letter if step.is_forward else letter.lower()


def gantt_text(schedule: Schedule, result: SimResult, width: int = 100) -> str:
    """A fixed-width ASCII Gantt chart of ``result`` over ``width`` columns per stage."""
    if width < 1:
        raise MuxcError(f"gantt_text width must be >= 1, got {width}")
    span = result.makespan
    scale = width / span if span > 0 else 0.0
    lines = [f"time 0 .. {span:.4g} (1 column = {span / width:.4g})"]
    for s, row in enumerate(schedule.order):
        cells = ["."] * width
        for step in row:
            a = min(width, round(result.start[step] * scale))
            b = min(width, round(result.end[step] * scale))
            if b <= a:
                continue
            box = _letter(step) + str(step.micro_batch)
            box = box if len(box) <= b - a else box[: b - a]
            for i in range(a, b):
                cells[i] = box[i - a] if i - a < len(box) else " "
        lines.append(f"stage {s} |{''.join(cells)}|")
    lines.append("legend: A.. = hTask 0.. forward, a.. = backward, digits = micro-batch, . = idle")
    return "\n".join(lines)


def gantt_png(
    schedule: Schedule,
    result: SimResult,
    path: str | Path,
    title: str | None = None,
    time_unit: str = "ms",
) -> Path:
    """Write a Gantt chart PNG of ``result`` to ``path`` and return the path.

    One row per stage (stage 0 on top), one box per step coloured by hTask, backward boxes
    lighter and hatched, each labelled with its micro-batch index. Uses matplotlib's Agg
    canvas directly (no pyplot, no global backend switch).
    Raises `GanttUnavailableError` when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise GanttUnavailableError(
            "gantt_png needs matplotlib: pip install matplotlib (or pip install -e '.[dev]'); "
            "gantt_text draws the same chart as text without it"
        ) from None
    out = Path(path)
    colours = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    ]
    fig = Figure(figsize=(max(6.0, min(24.0, 0.35 * max(len(r) for r in schedule.order))),
                          0.6 * schedule.stages + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    span = result.makespan if result.makespan > 0 else 1.0
    for s, row in enumerate(schedule.order):
        y = schedule.stages - 1 - s
        for step in row:
            a, b = result.start[step], result.end[step]
            colour = colours[step.htask % len(colours)]
            ax.broken_barh(
                [(a, b - a)], (y - 0.4, 0.8),
                facecolors=colour, alpha=1.0 if step.is_forward else 0.45,
                hatch=None if step.is_forward else "//", edgecolor="black", linewidth=0.5,
            )
            if (b - a) / span > 0.012:
                ax.text((a + b) / 2, y, str(step.micro_batch), ha="center", va="center",
                        fontsize=7, color="white" if step.is_forward else "black")
    ax.set_yticks(range(schedule.stages))
    ax.set_yticklabels([f"stage {schedule.stages - 1 - y}" for y in range(schedule.stages)])
    ax.set_xlim(0, span)
    ax.set_ylim(-0.6, schedule.stages - 0.4)
    ax.set_xlabel(f"time ({time_unit})")
    heading = title if title is not None else repr(schedule)
    ax.set_title(f"{heading}\nmakespan {result.makespan:.4g} {time_unit}, "
                 f"bubble fraction {result.bubble_fraction:.3f}", fontsize=9)
    handles = [Patch(facecolor=colours[h % len(colours)], label=f"hTask {h}")
               for h in range(schedule.htasks)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="forward"))
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="backward"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
