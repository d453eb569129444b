"""What a `muxc train` run records: per-task metrics rows in ``metrics.jsonl`` and
``metrics.csv`` (same rows), TensorBoard scalars when the ``tensorboard`` package is
installed, and a loss-curve PNG (matplotlib) at the end.

A row: ``step`` (run steps done), ``task``, ``split`` ("train" | "eval"), ``task_step`` (the
task's optimizer steps done), ``loss`` (train: mean over the step's micro-batches; eval:
token-weighted mean over the eval batches), ``lr`` (the rate the step used), ``tokens``
(trained label tokens; labelled rows for a seq_cls task), ``seconds`` (since the run, or its
resumed part, started), ``accuracy`` (eval rows of seq_cls tasks; empty otherwise).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

__all__ = ["FIELDS", "MetricsLog", "plot_losses"]

FIELDS = ("step", "task", "split", "task_step", "loss", "lr", "tokens", "seconds", "accuracy")


class MetricsLog:
    """Appends metrics rows to ``metrics.jsonl``/``metrics.csv`` under ``directory``.

    ``keep_until``: resuming after run step S keeps the rows of steps <= S from the previous
    run and drops later ones (written after that checkpoint, before the stop); None starts new
    files.
    """

    def __init__(self, directory: Path, keep_until: int | None = None):
        self.jsonl = directory / "metrics.jsonl"
        self.csv = directory / "metrics.csv"
        kept = [r for r in read_rows(self.jsonl) if r["step"] <= keep_until] \
            if keep_until is not None and self.jsonl.is_file() else []
        self._json = open(self.jsonl, "w")
        self._csv_file = open(self.csv, "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS)
        self._csv.writeheader()
        self.tensorboard = _tensorboard(directory / "tensorboard", keep_until)
        self.write(kept, tensorboard=False)

    def write(self, rows: Iterable[dict], tensorboard: bool = True) -> None:
        for row in rows:
            self._json.write(json.dumps(row) + "\n")
            self._csv.writerow(row)
            if tensorboard and self.tensorboard is not None:
                self.tensorboard.add_scalar(f"{row['task']}/{row['split']}_loss", row["loss"],
                                            row["step"])
                if row.get("accuracy") is not None:
                    self.tensorboard.add_scalar(f"{row['task']}/eval_accuracy", row["accuracy"],
                                                row["step"])
                if row["split"] == "train":
                    self.tensorboard.add_scalar(f"{row['task']}/lr", row["lr"], row["step"])
        self._json.flush()
        self._csv_file.flush()

    def close(self) -> None:
        self._json.close()
        self._csv_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(directory: Path, keep_until: int | None):
    """A SummaryWriter when ``tensorboard`` is importable (events after ``keep_until`` purged)."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory), purge_step=None if keep_until is None else keep_until + 1)


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(rows: list[dict], path: Path, title: str = "muxc train") -> Path | None:
    """Train (solid) and eval (dots) loss per task over run steps; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend or figure registry touched
    ax = fig.add_subplot()
    for i, task in enumerate(tasks):
        color = f"C{i % 10}"
        for split, style in (("train", dict(lw=1.2)), ("eval", dict(ls="none", marker="o", ms=4))):
            pts = [(r["step"], r["loss"]) for r in rows if r["task"] == task and r["split"] == split]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, label=f"{task} ({split})", **style)
    ax.set_xlabel("run step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path
