"""Tables, fits and plots of `muxc bench e2e` results (rows as written by `run_case`).

Used by `bench.e2e`.

>>> fit_line([(1, 110.0), (2, 120.0), (4, 140.0)])
(100.0, 10.0)
>>> tasks_within_budget(100.0, 10.0, budget=185.0)
8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "FULL",
    "fit_line",
    "tasks_within_budget",
    "budget_rows",
    "headline",
    "markdown",
    "notes",
    "plot",
    "profile_shares",
]

BASELINE = "hf-separate"
FULL = "muxc"
TARGETS = {"memory_ratio_vs_separate": 5.3, "cpu_throughput_vs_hf": 1.5, "gpu_throughput_vs_hf": 2.5}

Row = dict[str, Any]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b * x`` (one point: slope 0),
    rounded to 6 decimals."""
    n = len(points)
    if n == 0:
        raise ValueError("fit_line needs at least one point")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return round(my - slope * mx, 6), round(slope, 6)


def tasks_within_budget(intercept: float, slope: float, budget: float, cap: int = 4096) -> int:
    """Largest task count ``n`` with ``intercept + slope * n <= budget`` (at most ``cap``)."""
    if slope <= 0:
        return cap if intercept <= budget else 0
    return max(0, min(cap, math.floor((budget - intercept) / slope + 1e-9)))


def _groups(rows: Sequence[Row]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["model"], r["workload"]) for r in rows))


def _systems(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in rows))


def _pick(rows: Sequence[Row], **match) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def budget_rows(rows: Sequence[Row], budget_mib: float | None = None,
                budget_tasks: int = 8) -> list[Row]:
    """Per (model, workload, system): the fitted memory line and how many tasks fit the budget.

    The budget is ``budget_mib`` or, by default, what `BASELINE` measured at ``budget_tasks``
    tasks (the largest measured count up to it) for the same model and workload.
    """
    out = []
    for model, workload in _groups(rows):
        group = _pick(rows, model=model, workload=workload)
        budget, source = budget_mib, f"{budget_mib:.0f} MiB (given)" if budget_mib else ""
        if budget is None:
            base = [r for r in _pick(group, system=BASELINE) if r["tasks"] <= budget_tasks]
            if not base:
                continue
            ref = max(base, key=lambda r: r["tasks"])
            budget = ref["peak_mem_mib"]
            source = f"{BASELINE} at {ref['tasks']} tasks"
        for system in _systems(group):
            pts = [(r["tasks"], r["peak_mem_mib"]) for r in _pick(group, system=system)]
            if len({x for x, _ in pts}) < 2:
                continue  # a line needs two task counts
            a, b = fit_line(pts)
            out.append({
                "model": model, "workload": workload, "system": system,
                "base_mib": round(a, 1), "per_task_mib": round(b, 2),
                "budget_mib": round(budget, 1), "budget_source": source,
                "tasks_fit": tasks_within_budget(a, b, budget),
            })
    return out


def headline(rows: Sequence[Row], device: str, tasks: int = 8) -> dict[str, Any]:
    """The JSON summary: muxc full vs every system on the first model's non-uniform workload
    at ``tasks`` tasks (the largest measured count up to it if ``tasks`` was not run)."""
    model = next((r["model"] for r in rows if r["workload"] == "nonuniform"), None)
    group = _pick(rows, model=model, workload="nonuniform") if model else []
    counts = sorted({r["tasks"] for r in group if r["tasks"] <= tasks})
    out: dict[str, Any] = {"memory_ratio_vs_separate": None,
                           "effective_throughput_ratio_vs_hf_peft": None}
    if not counts:
        return out
    n = counts[-1]
    at = {r["system"]: r for r in group if r["tasks"] == n}
    full, base = at.get(FULL), at.get(BASELINE)
    if full is None or base is None:
        return out
    thr = {s: full["effective_tok_s"] / r["effective_tok_s"] for s, r in at.items() if s != FULL}
    mem = {s: r["peak_mem_mib"] / full["peak_mem_mib"] for s, r in at.items() if s != FULL}
    target = TARGETS["gpu_throughput_vs_hf" if device == "cuda" else "cpu_throughput_vs_hf"]
    out.update({
        "memory_ratio_vs_separate": round(mem[BASELINE], 3),
        "effective_throughput_ratio_vs_hf_peft": round(thr[BASELINE], 3),
        "effective_throughput_ratio_vs": {s: round(v, 3) for s, v in thr.items()},
        "memory_ratio_vs": {s: round(v, 3) for s, v in mem.items()},
        "model": model, "workload": "nonuniform", "tasks": n, "device": device,
        "clock": full.get("clock"),
        "muxc_options": full["options"], "commit": full.get("commit"),
        "targets_met": {
            f"memory_ratio>={TARGETS['memory_ratio_vs_separate']}":
                mem[BASELINE] >= TARGETS["memory_ratio_vs_separate"],
            f"throughput_vs_hf_separate>={target}": thr[BASELINE] >= target,
            "throughput_vs_every_other_system>1": all(v > 1 for v in thr.values()),
        },
    })
    return out


# ------------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def _table(rows: Sequence[Row], cols: Sequence[str], heads: Sequence[str] | None = None) -> str:
    lines = ["| " + " | ".join(heads or cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _result_rows(group: Sequence[Row]) -> list[Row]:
    """Group rows with ratios against `BASELINE` at the same task count."""
    base = {r["tasks"]: r for r in group if r["system"] == BASELINE}
    out = []
    for r in sorted(group, key=lambda r: (r["tasks"], _SYSTEM_ORDER.get(r["system"], 99))):
        b = base.get(r["tasks"])
        out.append({
            **r,
            "ineffective_pct": 100 * r["ineffective_fraction"],
            "thr_vs_sep": r["effective_tok_s"] / b["effective_tok_s"] if b else None,
            "mem_vs_sep": b["peak_mem_mib"] / r["peak_mem_mib"] if b else None,
        })
    return out


_SYSTEM_ORDER = {s: i for i, s in enumerate(
    ("hf-separate", "hf-multi-adapter", "spatial", "temporal", "muxc"))}
_COLS = [
    ("tasks", "tasks"), ("system", "system"), ("effective_tok_s", "effective tok/s"),
    ("raw_tok_s", "raw tok/s"), ("step_ms", "step ms"), ("wall_step_ms", "wall step ms"),
    ("ineffective_pct", "padding %"),
    ("peak_mem_mib", "peak MiB"), ("setup_peak_mib", "setup peak MiB"),
    ("compile_s", "compile s"), ("thr_vs_sep", "throughput vs sep"),
    ("mem_vs_sep", "memory saved vs sep"), ("plan", "muxc plan (last step)"),
]


def markdown(rows: Sequence[Row], *, meta: dict[str, Any], summary: dict[str, Any],
             budgets: Sequence[Row], profile: Sequence[Row], notes: Sequence[str],
             plots: Sequence[Path]) -> str:
    """The results page: how it was run, the headline, tables, budgets, profile, notes."""
    cols, heads = [c for c, _ in _COLS], [h for _, h in _COLS]
    out = [f"# muxc end-to-end benchmark: {meta['device']}", ""]
    dirty = " + uncommitted changes in muxc/ or bench/*.py" if meta["dirty"] else ""
    out += [f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s wall), {meta['timestamp']}, "
            f"commit {meta['commit']}{dirty}, "
            f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}.", ""]
    out += [f"Build measured: {meta['build']}", ""]
    out += [f"Setup: {meta['setup']}", ""]
    out += ["## Headline (muxc full vs the others, non-uniform workload)", "",
            "```json", _json(summary), "```", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    models = {r["model"]: r["model_desc"] for r in rows}
    for model, workload in _groups(rows):
        group = _pick(rows, model=model, workload=workload)
        out += [f"## {model} ({models[model]}), {workload}", "",
                _table(_result_rows(group), cols, heads), ""]
    if budgets:
        out += ["## Tasks that fit a memory budget", "",
                "Peak memory per system fitted as `base + per_task * tasks` over the measured "
                "task counts; `tasks fit` is the largest count whose fitted peak stays within "
                "the budget.", "",
                _table(budgets, ["model", "workload", "system", "base_mib", "per_task_mib",
                                 "budget_mib", "budget_source", "tasks_fit"],
                       ["model", "workload", "system", "base MiB", "MiB per task", "budget MiB",
                        "budget", "tasks fit"]), ""]
    if profile:
        shares = profile_shares(rows, profile)
        out += ["## Where the time goes (one profiled step, 8 non-uniform tasks)", "",
                "`us per computed token` = median step time / tokens computed (padding "
                "included), from the timed steps. The shares split one extra profiled step "
                "by operator kind (operator self time as `torch.profiler` clocks it); "
                "`python/framework` is the rest of that step's time.", "",
                _table(shares, list(shares[0])), ""]
    out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def profile_shares(rows: Sequence[Row], profile: Sequence[Row]) -> list[Row]:
    """Per profiled system: cost per computed token and each category's % of the step."""
    out = []
    for p in profile:
        timed = next(r for r in rows if r["system"] == p["system"] and r.get("profile"))
        share = {k: v for k, v in p.items() if k not in ("system", "step", "GEMM calls")}
        total = max(p["step"], sum(share.values()))
        out.append({
            "system": p["system"],
            "us per computed token": round(1e3 * timed["step_ms"]
                                           / timed["computed_tokens_per_step"], 1),
            "GEMM calls": p["GEMM calls"],
            **{f"{k} %": round(100 * v / total, 1) for k, v in share.items()},
        })
    return out


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)


# ---------------------------------------------------------------------------------- notes


def notes(rows: Sequence[Row], summary: dict[str, Any], budgets: Sequence[Row], device: str,
          weight_mib: dict[str, float]) -> list[str]:
    """Data-driven sentences on each target: met or missed, and the measured reason."""
    if summary.get("memory_ratio_vs_separate") is None:
        return [f"The headline case (non-uniform, {BASELINE} and {FULL}) was not measured."]
    n, model = summary["tasks"], summary["model"]
    at = {r["system"]: r for r in _pick(rows, model=model, workload="nonuniform", tasks=n)}
    out = [_memory_note(at, summary, n, weight_mib[model]),
           _throughput_note(at, summary, n, device)]
    fits = [b for b in budgets if b["model"] == model and b["workload"] == "nonuniform"]
    if fits:
        out.append(f"Tasks within {fits[0]['budget_mib']:.0f} MiB ({fits[0]['budget_source']}, "
                   f"{model}, non-uniform): "
                   + ", ".join(f"{b['system']} {b['tasks_fit']}" for b in fits) + ".")
    uniform = _pick(rows, model=model, workload="uniform", tasks=n)
    by = {r["system"]: r for r in uniform}
    if FULL in by and BASELINE in by:
        ratio = by[FULL]["effective_tok_s"] / by[BASELINE]["effective_tok_s"]
        out.append(
            f"Uniform workload ({model}, {n} tasks): muxc full runs at {ratio:.2f}x "
            f"{BASELINE} with {100 * by[FULL]['ineffective_fraction']:.0f}% padding vs "
            f"{100 * by[BASELINE]['ineffective_fraction']:.0f}%: when every task has the same "
            "lengths, chunking removes little padding and its extra work shows.")
    return out


def _memory_note(at: dict[str, Row], summary: dict[str, Any], n: int, weight: float) -> str:
    target = TARGETS["memory_ratio_vs_separate"]
    sep, full = at[BASELINE], at[FULL]
    ok = summary["memory_ratio_vs_separate"] >= target
    text = (f"Memory target (>= {target}x at {n} tasks): {'met' if ok else 'MISSED'}: muxc full "
            f"peaks at {full['peak_mem_mib']:.0f} MiB vs {sep['peak_mem_mib']:.0f} MiB for {n} "
            f"separate instances ({summary['memory_ratio_vs_separate']:.2f}x). One base copy is "
            f"{weight:.3g} MiB, so the {n} copies are {n * weight:.3g} MiB of the separate "
            f"instances' peak; the other {sep['peak_mem_mib'] - n * weight:.0f} MiB is one "
            f"task's activations (they train one at a time), adapters, optimizer state and "
            f"the runtime. muxc keeps one copy, so {full['peak_mem_mib'] - weight:.0f} MiB of "
            "its peak is activations (a fused step keeps every task's activations until its "
            "backward), adapters, optimizer state, and the compiled graphs.")
    if not ok:
        text += (" The ratio approaches the task count only when one base copy outweighs the "
                 "tasks' activations; for this small CPU model one task's activations already "
                 "exceed the weights.")
    if "temporal" in at:
        text += (f" Temporal-only (one copy, one task's activations at a time): "
                 f"{sep['peak_mem_mib'] / at['temporal']['peak_mem_mib']:.2f}x.")
    return text


def _throughput_note(at: dict[str, Row], summary: dict[str, Any], n: int, device: str) -> str:
    target = TARGETS["gpu_throughput_vs_hf" if device == "cuda" else "cpu_throughput_vs_hf"]
    sep, full = at[BASELINE], at[FULL]
    thr = summary["effective_throughput_ratio_vs_hf_peft"]
    others = summary["effective_throughput_ratio_vs"]
    pads = ", ".join(f"{s} {100 * r['ineffective_fraction']:.0f}%" for s, r in at.items())
    text = (f"Throughput target (>= {target}x vs {BASELINE}, > 1x vs every other system): "
            f"{'met' if thr >= target else 'MISSED'} vs {BASELINE} ({thr:.2f}x); "
            f"{'met' if all(v > 1 for v in others.values()) else 'MISSED'} vs all others ("
            + ", ".join(f"{s} {v:.2f}x" for s, v in others.items()) + "). "
            f"Padding at {n} tasks: {pads}.")
    if device == "cuda":
        return text
    p_sep, p_full = sep["ineffective_fraction"], full["ineffective_fraction"]
    predicted = (1 - p_full) / (1 - p_sep)
    us = {s: 1e3 * r["step_ms"] / r["computed_tokens_per_step"] for s, r in at.items()}
    text += (f" On this CPU the GEMMs are compute-bound, so a fused GEMM is no cheaper per "
             f"token than separate ones and throughput follows the tokens computed: with equal "
             f"cost per computed token, muxc's padding would give {predicted:.2f}x, and even "
             f"zero padding only {1 / (1 - p_sep):.2f}x, below the {target}x target. Measured "
             f"cost per computed token: " + ", ".join(f"{s} {v:.0f} us" for s, v in us.items())
             + f", i.e. muxc full spends {us[FULL] / us[BASELINE]:.2f}x what {BASELINE} does "
             "per computed token (see the profile for where)."
             + (f" muxc full's executor ran: {full['plan']}." if full.get("plan") else ""))
    return text


# ---------------------------------------------------------------------------------- plots


def plot(rows: Sequence[Row], metric: str, label: str, path: Path, title: str) -> str | None:
    """One panel per (model, workload): ``metric`` vs tasks, one line per system. Returns a
    note instead of writing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plots written"
    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (model, workload) in zip(axes[0], groups):
        group = _pick(rows, model=model, workload=workload)
        for system in _systems(group):
            pts = sorted((r["tasks"], r[metric]) for r in _pick(group, system=system))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tasks")
        ax.set_ylabel(label)
        ax.set_title(f"{model}, {workload}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
