"""Tables, fits and plots of `muxc bench e2e` results (rows as written by `run_case`).

Used by `bench.e2e`.

>>> fit_line([(1, 110.0), (2, 120.0), (4, 140.0)])
(100.0, 10.0)
>>> tasks_within_budget(100.0, 10.0, budget=185.0)
8
>>> missed_by(0.9, ">=", 1.15)
'short by 0.25 (1.28x to go)'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "FULL",
    "MULTI",
    "PAD_FIXED",
    "TARGETS",
    "Target",
    "fit_line",
    "tasks_within_budget",
    "budget_rows",
    "part_rows",
    "headline",
    "missed_by",
    "target_rows",
    "markdown",
    "notes",
    "plot",
    "profile_shares",
]

BASELINE = "hf-separate"
FULL = "muxc"
MULTI = "hf-multi-adapter"
PAD_FIXED = ("spatial", "temporal")
"""The main systems that are fixed configurations too (alignment pad)."""

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """A bound on one key of the JSON summary: ``value op bound`` (op ``>=`` or ``<=``)."""

    key: str
    op: str
    bound: float
    what: str

    @property
    def label(self) -> str:
        return f"{self.key}{self.op}{self.bound:g}"

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.op == ">=" else value <= self.bound


TARGETS = (
    Target("us_per_token_ratio_vs_hf_peft", "<=", 1.05,
           "muxc full / hf-separate cost per computed token, 8 non-uniform tasks"),
    Target("effective_throughput_ratio_vs_hf_peft", ">=", 1.15,
           "muxc full / hf-separate effective tokens/s, 8 non-uniform tasks"),
    Target("effective_throughput_ratio_vs_hf_peft_uniform", ">=", 1.0,
           "the same, 8 uniform tasks"),
    Target("auto_vs_best_fixed", ">=", 0.95,
           "muxc full / the best fixed configuration's effective tokens/s"),
    Target("memory_ratio_vs_separate_large", ">=", 6.0,
           "hf-separate / muxc full peak memory, 8 tasks, weights-dominant model"),
    Target("memory_large_muxc_vs_multi_adapter", "<=", 1.0,
           "muxc full / hf-multi-adapter peak memory, same case"),
    Target("compile_s_ratio_16_vs_1", "<=", 2.0,
           "muxc compile seconds, 16 vs 1 equal-structure tasks"),
)
"""The issue-9 targets, in the order the report lists them."""


def missed_by(value: float, op: str, bound: float) -> str:
    """How far ``value`` is from meeting ``op bound`` ("" when it meets it)."""
    if op == ">=":
        if value >= bound:
            return ""
        ratio = f"{bound / value:.2f}x to go" if value > 0 else "nothing measured above 0"
        return f"short by {bound - value:.3g} ({ratio})"
    if value <= bound:
        return ""
    return f"over by {value - bound:.3g} (must fall {100 * (1 - bound / value):.0f}%)"


def part_rows(rows: Sequence[Row], part: str) -> list[Row]:
    """The rows of one benchmark part (rows without a ``part`` are ``main``)."""
    return [r for r in rows if r.get("part", "main") == part]


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
    """The JSON summary. From the main part: muxc full vs every system on the first model's
    non-uniform workload at ``tasks`` tasks (the largest measured count up to it if ``tasks``
    was not run), cost per computed token, the padding ceiling and the uniform workload's
    ratio; from the sweep: muxc full vs the best fixed configuration; from the memory part:
    the weights-dominant memory ratios; from the compile part: the 16-vs-1 compile ratio.
    A key whose cases were not run is None. ``targets_met`` checks `TARGETS`."""
    out: dict[str, Any] = {"memory_ratio_vs_separate": None,
                           "effective_throughput_ratio_vs_hf_peft": None}
    main = part_rows(rows, "main")
    model = next((r["model"] for r in main if r["workload"] == "nonuniform"), None)
    group = _pick(main, model=model, workload="nonuniform") if model else []
    counts = sorted({r["tasks"] for r in group if r["tasks"] <= tasks})
    n = counts[-1] if counts else None
    at = {r["system"]: r for r in group if r["tasks"] == n}
    full, base = at.get(FULL), at.get(BASELINE)
    if full is not None and base is not None:
        thr = {s: full["effective_tok_s"] / r["effective_tok_s"] for s, r in at.items()
               if s != FULL}
        mem = {s: r["peak_mem_mib"] / full["peak_mem_mib"] for s, r in at.items() if s != FULL}
        us = {s: _us_per_token(r) for s, r in at.items()}
        out.update({
            "memory_ratio_vs_separate": round(mem[BASELINE], 3),
            "effective_throughput_ratio_vs_hf_peft": round(thr[BASELINE], 3),
            "effective_throughput_ratio_vs": {s: round(v, 3) for s, v in thr.items()},
            "memory_ratio_vs": {s: round(v, 3) for s, v in mem.items()},
            "model": model, "workload": "nonuniform", "tasks": n, "device": device,
            "clock": full.get("clock"),
            "muxc_options": full["options"], "commit": full.get("commit"),
            "us_per_computed_token": {s: round(v, 1) for s, v in us.items()},
            "us_per_token_ratio_vs_hf_peft": round(us[FULL] / us[BASELINE], 3),
            "padding_ceiling": round(base["computed_tokens_per_step"]
                                     / base["effective_tokens_per_step"], 3),
        })
        uniform = {r["system"]: r for r in _pick(main, model=model, workload="uniform", tasks=n)}
        if FULL in uniform and BASELINE in uniform:
            out["effective_throughput_ratio_vs_hf_peft_uniform"] = round(
                uniform[FULL]["effective_tok_s"] / uniform[BASELINE]["effective_tok_s"], 3)
        fixed = {s: r for s, r in at.items() if s in PAD_FIXED}
        fixed.update({r["system"]: r for r in _pick(part_rows(rows, "sweep"), model=model,
                                                     workload="nonuniform", tasks=n)})
        if fixed:
            best = max(fixed, key=lambda s: fixed[s]["effective_tok_s"])
            out.update({
                "auto_vs_best_fixed": round(full["effective_tok_s"]
                                            / fixed[best]["effective_tok_s"], 3),
                "best_fixed": best,
                "fixed_configs": sorted(fixed),
            })
    out.update(_memory_large(part_rows(rows, "memory-large"), tasks))
    out.update(_compile_ratio(part_rows(rows, "compile")))
    out["gpu_run"] = device == "cuda"
    out.setdefault("device", device)
    for key in [t.key for t in TARGETS] + ["padding_ceiling"]:
        out.setdefault(key, None)
    out["targets_met"] = {t.label: t.met(out[t.key]) for t in TARGETS}
    return out


def _us_per_token(row: Row) -> float:
    """Microseconds of a step per computed token (padding included)."""
    return 1e3 * row["step_ms"] / row["computed_tokens_per_step"]


def _memory_large(rows: Sequence[Row], tasks: int) -> dict[str, Any]:
    """The memory part's ratios at ``tasks`` tasks (the largest measured count up to it)."""
    counts = sorted({r["tasks"] for r in rows if r["tasks"] <= tasks})
    if not counts:
        return {}
    at = {r["system"]: r for r in rows if r["tasks"] == counts[-1]}
    out: dict[str, Any] = {"memory_large": {
        "model": next(iter(at.values()))["model"], "tasks": counts[-1],
        "peak_mib": {s: round(r["peak_mem_mib"], 1) for s, r in at.items()},
        "muxc_plan": at[FULL].get("plan", "") if FULL in at else ""}}
    if FULL in at and BASELINE in at:
        out["memory_ratio_vs_separate_large"] = round(
            at[BASELINE]["peak_mem_mib"] / at[FULL]["peak_mem_mib"], 3)
    if FULL in at and MULTI in at:
        out["memory_large_muxc_vs_multi_adapter"] = round(
            at[FULL]["peak_mem_mib"] / at[MULTI]["peak_mem_mib"], 3)
    return out


def compile_seconds(row: Row) -> float:
    """Compile seconds of a muxc row: process CPU time where the row's clock is CPU time
    (one thread, a shared machine), else wall time."""
    if row.get("clock") == "cpu" and row.get("compile_cpu_s"):
        return row["compile_cpu_s"]
    return row["compile_s"]


def _compile_ratio(rows: Sequence[Row]) -> dict[str, Any]:
    """muxc compile seconds of 16 tasks vs one task (the compile part)."""
    by = {r["tasks"]: r for r in rows if r["system"] == FULL}
    if not by:
        return {}
    seconds = {n: round(compile_seconds(r), 2) for n, r in sorted(by.items())}
    out: dict[str, Any] = {"compile_s": {str(n): v for n, v in seconds.items()},
                           "compile_model": next(iter(by.values()))["model"]}
    if 1 in seconds and 16 in seconds:
        out["compile_s_ratio_16_vs_1"] = round(seconds[16] / seconds[1], 3)
    return out


def target_rows(summary: dict[str, Any]) -> list[Row]:
    """One row per target: what it bounds, the measured value, met, and by how much not."""
    out = []
    for t in TARGETS:
        value = summary.get(t.key)
        met = t.met(value)
        out.append({
            "target": f"`{t.key}` {t.op} {t.bound:g}", "what": t.what,
            "measured": "not measured" if value is None else f"{value:.3g}",
            "met": "-" if met is None else ("met" if met else "MISSED"),
            "missed by": "" if value is None else missed_by(value, t.op, t.bound),
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
    if meta.get("load"):
        out += [f"Machine load (1/5/15-minute load averages; other jobs share the CPUs): "
                f"{meta['load']}.", ""]
    out += [f"Build measured: {meta['build']}", ""]
    out += [f"Setup: {meta['setup']}", ""]
    out += ["## Headline (muxc full vs the others, non-uniform workload)", "",
            "```json", _json(summary), "```", ""]
    out += ["## Targets", "",
            _table(target_rows(summary), ["target", "what", "measured", "met", "missed by"]),
            ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    models = {r["model"]: r["model_desc"] for r in rows}
    main = part_rows(rows, "main")
    for model, workload in _groups(main):
        group = _pick(main, model=model, workload=workload)
        out += [f"## {model} ({models[model]}), {workload}", "",
                _table(_result_rows(group), cols, heads), ""]
    out += _sweep_section(rows)
    out += _memory_section(part_rows(rows, "memory-large"), models)
    out += _compile_section(part_rows(rows, "compile"), models)
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


def _sweep_section(rows: Sequence[Row]) -> list[str]:
    """muxc full next to every fixed configuration measured with it (same model, workload and
    tasks, side by side)."""
    sweep = part_rows(rows, "sweep")
    out: list[str] = []
    for model, workload, n in dict.fromkeys((r["model"], r["workload"], r["tasks"])
                                            for r in sweep):
        here = _pick(rows, model=model, workload=workload, tasks=n)
        full = next((r for r in here if r["system"] == FULL), None)
        fixed = [r for r in here if r["system"] in PAD_FIXED or r.get("part") == "sweep"]
        table = []
        for r in sorted(fixed + ([full] if full else []), key=lambda r: -r["effective_tok_s"]):
            table.append({
                **r, "ineffective_pct": 100 * r["ineffective_fraction"],
                "us": _us_per_token(r),
                "full_vs": full["effective_tok_s"] / r["effective_tok_s"] if full else None,
            })
        out += [f"## muxc full vs fixed configurations: {model}, {workload}, {n} tasks", "",
                f"{len(fixed)} fixed configurations measured side by side with the main "
                "systems: `spatial`/`temporal` are fusion with alignment pad, `<fusion>-chunk<N>` "
                "alignment chunk at chunk size N (options in the CSV); sorted by effective "
                "throughput.", "",
                _table(table, ["system", "effective_tok_s", "step_ms", "ineffective_pct", "us",
                               "peak_mem_mib", "plan", "full_vs"],
                       ["system", "effective tok/s", "step ms", "padding %",
                        "us per computed token", "peak MiB", "plan (last step)",
                        "muxc full vs this"]), ""]
    return out


def _memory_section(rows: Sequence[Row], models: dict[str, str]) -> list[str]:
    """The weights-dominant memory part: peaks per system and task count."""
    out: list[str] = []
    for model, workload in _groups(rows):
        group = _result_rows(_pick(rows, model=model, workload=workload))
        strict = all(r.get("strict_malloc") for r in group)
        steady = all(r.get("steady_peak") for r in group)
        out += [f"## Memory, weights-dominant model: {model} ({models[model]}), {workload}", "",
                ("Steady state: the peak of one step after a warm-up step on the same batches "
                 "(every system's optimizer state already allocated)" if steady else
                 "One step per case (optimizer state created in it)") + ", one case at a time"
                + ("; RSS made to follow live memory (`mallopt`: mmap threshold 64 KiB, trim "
                   "threshold 0, as `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`)"
                   if strict else "") + ". Step times here include first-step set-up: they "
                "are not throughput measurements.", "",
                _table(group, ["tasks", "system", "peak_mem_mib", "setup_peak_mib",
                               "mem_vs_sep", "compile_s", "step_ms"],
                       ["tasks", "system", "peak MiB", "setup peak MiB", "memory saved vs sep",
                        "compile s", "step ms"]), ""]
    return out


def _compile_section(rows: Sequence[Row], models: dict[str, str]) -> list[str]:
    if not rows:
        return []
    table = [{**r, "seconds": compile_seconds(r)} for r in sorted(rows, key=lambda r: r["tasks"])]
    model = rows[0]["model"]
    return [f"## Compile time: {model} ({models[model]}), {rows[0]['workload']} tasks", "",
            "`muxc.compile` of N tasks with the same structure (LoRA r=8 on q/v), one case at a "
            "time; `compile s` is what the ratio uses (CPU time on single-threaded CPU runs, "
            "else wall).", "",
            _table(table, ["tasks", "system", "seconds", "compile_s", "compile_cpu_s", "clock"],
                   ["tasks", "system", "compile s", "wall s", "CPU s", "clock"]), ""]


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
    """Data-driven sentences on each target: met or missed (by how much), and the measured
    reason."""
    out = []
    main = part_rows(rows, "main")
    if summary.get("memory_ratio_vs_separate") is None:
        out.append(f"The headline case (non-uniform, {BASELINE} and {FULL}) was not measured.")
    else:
        n, model = summary["tasks"], summary["model"]
        at = {r["system"]: r for r in _pick(main, model=model, workload="nonuniform", tasks=n)}
        out += [_memory_note(at, summary, n, weight_mib[model]),
                _throughput_note(at, summary, n, device)]
        if summary.get("auto_vs_best_fixed") is not None:
            out.append(_sweep_note(summary))
        fits = [b for b in budgets if b["model"] == model and b["workload"] == "nonuniform"]
        if fits:
            out.append(_fits_note(fits, model, "non-uniform"))
        uniform = {r["system"]: r for r in _pick(main, model=model, workload="uniform", tasks=n)}
        if FULL in uniform and BASELINE in uniform:
            out.append(_uniform_note(uniform, summary, model, n))
    large = summary.get("memory_large")
    if large:
        out.append(_memory_large_note(summary, weight_mib[large["model"]]))
        fits = [b for b in budgets if b["model"] == large["model"]]
        if fits:
            out.append(_fits_note(fits, large["model"], fits[0]["workload"]))
    if summary.get("compile_s"):
        out.append(_compile_note(summary))
    return out


def _verdict(summary: dict[str, Any], key: str) -> str:
    """``met`` or ``MISSED (short by ...)`` for the target on ``key``."""
    t = next(t for t in TARGETS if t.key == key)
    value = summary.get(key)
    if value is None:
        return "not measured"
    return "met" if t.met(value) else f"MISSED ({missed_by(value, t.op, t.bound)})"


def _fits_note(fits: Sequence[Row], model: str, workload: str) -> str:
    return (f"Tasks within {fits[0]['budget_mib']:.0f} MiB ({fits[0]['budget_source']}, "
            f"{model}, {workload}): "
            + ", ".join(f"{b['system']} {b['tasks_fit']}" for b in fits) + ".")


def _memory_note(at: dict[str, Row], summary: dict[str, Any], n: int, weight: float) -> str:
    sep, full = at[BASELINE], at[FULL]
    text = (f"Memory on the throughput model ({n} tasks): muxc full peaks at "
            f"{full['peak_mem_mib']:.0f} MiB vs {sep['peak_mem_mib']:.0f} MiB for {n} separate "
            f"instances ({summary['memory_ratio_vs_separate']:.2f}x). One base copy is "
            f"{weight:.3g} MiB, so the {n} copies are {n * weight:.3g} MiB of the separate "
            f"instances' peak; the other {sep['peak_mem_mib'] - n * weight:.0f} MiB is one "
            f"task's activations (they train one at a time), adapters, optimizer state and "
            f"the runtime. muxc keeps one copy, so {full['peak_mem_mib'] - weight:.0f} MiB of "
            "its peak is activations, adapters, optimizer state, and the compiled graphs. On "
            "a model this small activations outweigh the weights, so the ratio stays far "
            "below the task count; the memory target is measured on the weights-dominant "
            "model instead.")
    if "temporal" in at:
        text += (f" Temporal-only (one copy, one task's activations at a time): "
                 f"{sep['peak_mem_mib'] / at['temporal']['peak_mem_mib']:.2f}x.")
    return text


def _throughput_note(at: dict[str, Row], summary: dict[str, Any], n: int, device: str) -> str:
    sep, full = at[BASELINE], at[FULL]
    thr = summary["effective_throughput_ratio_vs_hf_peft"]
    others = summary["effective_throughput_ratio_vs"]
    pads = ", ".join(f"{s} {100 * r['ineffective_fraction']:.0f}%" for s, r in at.items())
    text = (f"Throughput target (>= 1.15x vs {BASELINE}, {n} non-uniform tasks): "
            f"{_verdict(summary, 'effective_throughput_ratio_vs_hf_peft')} at {thr:.2f}x; vs "
            "the others: " + ", ".join(f"{s} {v:.2f}x" for s, v in others.items()) + ". "
            f"Padding at {n} tasks: {pads}.")
    p_sep, p_full = sep["ineffective_fraction"], full["ineffective_fraction"]
    predicted = (1 - p_full) / (1 - p_sep)
    us = summary["us_per_computed_token"]
    text += (f" Cost per computed token: " + ", ".join(f"{s} {v:.0f} us" for s, v in us.items())
             + f"; muxc full / {BASELINE} = {summary['us_per_token_ratio_vs_hf_peft']:.2f} "
             f"(target <= 1.05: {_verdict(summary, 'us_per_token_ratio_vs_hf_peft')}). "
             f"Throughput = padding gain x per-token cost: at equal cost per computed token "
             f"muxc's padding would give {predicted:.2f}x, and no padding at all "
             f"{summary['padding_ceiling']:.2f}x (`padding_ceiling`).")
    if device != "cuda":
        text += (" On this CPU the GEMMs are compute-bound, so a fused GEMM is no cheaper per "
                 "token than separate ones: the padding ceiling is the most fusion can give.")
    if full.get("plan"):
        text += f" muxc full's executor ran: {full['plan']}."
    return text


def _sweep_note(summary: dict[str, Any]) -> str:
    return (f"Auto vs fixed (>= 0.95): {_verdict(summary, 'auto_vs_best_fixed')}: muxc full "
            f"reaches {summary['auto_vs_best_fixed']:.2f}x the effective throughput of the "
            f"best of {len(summary['fixed_configs'])} fixed configurations "
            f"({summary['best_fixed']}; measured: {', '.join(summary['fixed_configs'])}).")


def _uniform_note(by: dict[str, Row], summary: dict[str, Any], model: str, n: int) -> str:
    ratio = summary["effective_throughput_ratio_vs_hf_peft_uniform"]
    return (f"Uniform workload ({model}, {n} tasks; target >= 1.0: "
            f"{_verdict(summary, 'effective_throughput_ratio_vs_hf_peft_uniform')}): muxc full "
            f"runs at {ratio:.2f}x {BASELINE} with {100 * by[FULL]['ineffective_fraction']:.0f}% "
            f"padding vs {100 * by[BASELINE]['ineffective_fraction']:.0f}%: when every task "
            "has the same lengths, chunking removes little padding and its extra work shows.")


def _memory_large_note(summary: dict[str, Any], weight: float) -> str:
    large = summary["memory_large"]
    n, peaks = large["tasks"], large["peak_mib"]
    text = (f"Memory target on the weights-dominant model ({large['model']}, one copy "
            f"{weight:.0f} MiB, {n} tasks): peaks " + ", ".join(f"{s} {v:.0f} MiB"
                                                               for s, v in peaks.items())
            + ". hf-separate / muxc full >= 6: "
            f"{_verdict(summary, 'memory_ratio_vs_separate_large')}; muxc full <= "
            f"hf-multi-adapter: {_verdict(summary, 'memory_large_muxc_vs_multi_adapter')}.")
    if FULL in peaks:
        text += (f" muxc full holds one copy, so {peaks[FULL] - weight:.0f} MiB of its peak is "
                 "adapters, optimizer state, activations and the compiled program (it ran "
                 f"{large['muxc_plan'] or 'an unrecorded plan'}; tasks fused in one hTask hold "
                 "their activations, logits included, at the same time)")
        if BASELINE in peaks:
            text += (f"; a 6x ratio needs muxc full under {peaks[BASELINE] / 6:.0f} MiB, i.e. "
                     f"at most {peaks[BASELINE] / 6 - weight:.0f} MiB beyond the weights")
        text += "."
    return text


def _compile_note(summary: dict[str, Any]) -> str:
    seconds = summary["compile_s"]
    text = (f"Compile time ({summary['compile_model']}, equal-structure tasks): "
            + ", ".join(f"{n} task(s) {v:.1f} s" for n, v in seconds.items()))
    if summary.get("compile_s_ratio_16_vs_1") is not None:
        text += (f"; 16 vs 1 = {summary['compile_s_ratio_16_vs_1']:.2f}x (target <= 2: "
                 f"{_verdict(summary, 'compile_s_ratio_16_vs_1')})")
    return text + "."


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
