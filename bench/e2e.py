"""``python -m bench.e2e`` (or ``muxc bench e2e``): muxc end to end against the systems users
would pick instead.

Trains N synthetic PEFT tasks (uniform and non-uniform lengths and adapters) with five systems
on the same batches for the same steps: HF-PEFT separate instances, HF-PEFT one model with many
adapters, spatial-only muxc (S-LoRA style), temporal-only muxc (mLoRA style) and muxc full
(see `bench.e2e_systems`). Every (model, workload, tasks, system) case runs in a fresh
process, forked from a server that has only imported the libraries, so its peak memory
(GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS) minus the idle baseline measured in
that process before building anything is the case's own.

Metrics per case: effective tokens/s (non-padding tokens, the ones that carry loss), raw
tokens/s (every token the system computes, padding included), step time (medians over the
timed steps after warm-up), peak memory during training, and, from a line fitted to memory vs
tasks, how many tasks fit a memory budget.

Parts (``--parts``, default all four):

- ``main``: the five systems over models x workloads x task counts (the tables);
- ``sweep``: fixed configurations (muxc with fusion spatial/temporal x alignment chunk at
  chunk sizes 16/32/64/128; ``--quick``: 32/64) at the headline task count, side by side with
  the main systems there; with ``spatial`` and ``temporal`` (alignment pad) they are the grid
  ``auto_vs_best_fixed`` compares muxc full's automatic choice with;
- ``memory-large`` (alone: ``--memory-large``): peak memory on a weights-dominant model
  (``llama-large``: Llama 12 x 768, vocab 32k, ~125M parameters) at 1/2/4/8/16 tasks for all
  five systems (``--quick``: 8 tasks; hf-separate, hf-multi-adapter, muxc), the peak of one
  step after a warm-up step on the same batches (steady state: optimizer state allocated),
  one case at a time, RSS made to follow live memory (`e2e_systems.strict_malloc`);
- ``compile``: muxc compile seconds for 1 and 16 equal-structure tasks (``llama-tiny``).

Writes ``bench/results/e2e-<device>.csv`` (tidy, one row per case, ``part`` column), ``.md``
(tables, targets, notes) and ``-throughput.png`` / ``-memory.png``; prints the markdown path
and, as its last line, a JSON summary (muxc full vs every system, 8 non-uniform tasks, and
the issue-9 metrics: see `bench.e2e_report.headline`). While it runs, the rows measured so far
are in ``e2e-<device>[-quick].partial.csv`` (removed at the end), so a run cut short by a
timeout still leaves its numbers.

>>> plan(quick=True, device="cpu")[0]
('llama-cpu', 'nonuniform', 2, 'hf-separate')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import e2e_report, e2e_systems, harness
from bench.harness import ROOT, resolve_device

__all__ = ["main", "plan"]

PRELOAD = ["torch", "transformers", "peft", "muxc", "bench.e2e",
           "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"]
"""What the forkserver imports once, before forking a worker per case. Workers unpickle
`_turns` as ``bench.e2e._turns``: they get the parent's ``sys.path``, so `bench` imports there
whenever it imported here."""
HEADLINE_TASKS = 8
PARTS = ("main", "sweep", "memory-large", "compile")
QUICK_FIXED_CHUNKS = (32, 64)
"""The reduced sweep of ``--quick``: 6 of the 10 fixed configurations (pad and chunk 32/64)."""
MEMORY_MODEL = {"cpu": "llama-large", "cuda": "llama-large-gpu"}
MEMORY_WORKLOAD = "nonuniform-short"
MEMORY_TASKS = {True: (8,), False: (1, 2, 4, 8, 16)}
MEMORY_QUICK_SYSTEMS = ("hf-separate", "hf-multi-adapter", "muxc")
COMPILE_MODEL, COMPILE_TASKS = "llama-tiny", (1, 16)


# ------------------------------------------------------------------------------------ plan

_PLANS = {
    # (quick, device) -> models, workloads, task counts
    (True, "cpu"): (("llama-cpu",), ("nonuniform",), (2, 8)),
    (False, "cpu"): (("llama-cpu", "gpt2-cpu"), ("nonuniform", "uniform"), (1, 2, 4, 8, 16)),
    (True, "cuda"): (("llama-gpu",), ("nonuniform",), (2, 8)),
    (False, "cuda"): (("llama-gpu",), ("nonuniform", "uniform"), (1, 2, 4, 8, 16, 32)),
}


def plan(quick: bool, device: str, models=None, workloads=None, tasks=None,
         systems=None) -> list[tuple[str, str, int, str]]:
    """The cases to run, in order: (model, workload, tasks, system); None picks the default."""
    d_models, d_workloads, d_tasks = _PLANS[(quick, device)]
    systems = systems or e2e_systems.SYSTEMS
    return [(m, w, n, s) for m in models or d_models for w in workloads or d_workloads
            for n in tasks or d_tasks for s in systems]


# --------------------------------------------------------------------------------- running


def _quiet_libraries() -> None:
    """In a worker process: no transformers deprecation warnings or info logs on stderr."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecations
    hf_logging.set_verbosity_error()


def _turns(case: dict[str, Any], conn) -> None:
    """Runs in a fresh child process: builds one case, then runs steps when told to."""
    try:
        _quiet_libraries()
        run = e2e_systems.CaseRun(e2e_systems.Case(**case))
        conn.send(("ready", run.total_steps))
        while True:
            what, arg = conn.recv()
            if what == "step":
                conn.send(("done", run.step(arg)))
            elif what == "finish":
                conn.send(("row", run.finish()))
                return
    except torch.OutOfMemoryError as exc:
        conn.send(("oom", str(exc).splitlines()[0]))
    except BaseException:  # the parent re-raises it with the case named
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _warm(case: dict[str, Any]) -> None:
    """Runs in a fresh child process: builds muxc full for ``case``, which loads its cost
    profile, or measures what the profile lacks and saves it (`muxc.plan.load_or_profile`)."""
    _quiet_libraries()
    e2e_systems.CaseRun(e2e_systems.Case(**case))


def profile_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases whose muxc full build warms the cost profile before anything is measured: per
    (model, workload, profile path), the muxc case with the most tasks (its program's op keys
    cover those of fewer tasks of the same workload).

    >>> c = dict(model="m", workload="w", system="muxc", cost_model="p.json")
    >>> [x["tasks"] for x in profile_cases([{**c, "tasks": 2}, {**c, "tasks": 8},
    ...                                      {**c, "tasks": 4, "system": "temporal"}])]
    [8]
    """
    largest: dict[tuple, dict[str, Any]] = {}
    for case in cases:
        if case["system"] != "muxc" or not case.get("cost_model"):
            continue
        key = (case["model"], case["workload"], case["cost_model"])
        if key not in largest or case["tasks"] > largest[key]["tasks"]:
            largest[key] = case
    return list(largest.values())


def warm_profiles(cases: list[dict[str, Any]], log) -> None:
    """Make muxc full's cost profile complete for every case before any is measured, each
    build in a process of its own (`profile_cases`). muxc profiles missing keys in a child
    process of the process that compiles (`muxc.plan.isolated`), but that would still happen
    during a measured case's setup: minutes of profiling while the other systems' case
    processes of the same turn wait or build beside it, a profile measured under their load,
    and two case processes of one profile path profiling at once."""
    ctx = _context()
    for case in profile_cases(cases):
        t0 = time.perf_counter()
        proc = ctx.Process(target=_warm, args=(case,), daemon=True)
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"building muxc full for {case['model']} {case['workload']} "
                               f"{case['tasks']} tasks to load its cost profile failed (exit "
                               f"code {proc.exitcode}); run that case alone to see why")
        log(f"cost profile for {case['model']} {case['workload']}: {case['cost_model']} "
            f"complete ({time.perf_counter() - t0:.0f} s, not measured)")


class _OutOfMemory(Exception):
    """A case ran out of device memory (its row says so; the run goes on)."""


def _expect(conn, what: str, case: dict[str, Any]):
    got, value = conn.recv()
    if got == "oom":
        raise _OutOfMemory(value)
    if got == "error":
        raise RuntimeError(f"case {case} failed in its worker process:\n{value}")
    if got != what:
        raise RuntimeError(f"case {case}: worker sent {got!r}, expected {what!r}")
    return value


def run_group(ctx, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``cases`` (same model/workload/tasks) in one fresh process each, side by side.

    The processes build their systems concurrently, then take turns: step ``i`` runs in one
    process at a time, in an order rotated every step, so load from elsewhere on the machine
    hits every system alike. Each process measures its own memory. A case that runs out of
    device memory leaves the turns and gets a row with ``status="oom"``.
    """
    procs, failed = [], []
    try:
        for case in cases:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_turns, args=(case, theirs), daemon=True)
            proc.start()
            theirs.close()
            procs.append((proc, mine, case))
        live = _survivors(procs, "ready", failed)
        for i in range(live[0][3] if live else 0):
            k = i % len(live)
            ran = {id(e[0]) for e in _survivors(live[k:] + live[:k], "done", failed, step=i)}
            live = [entry for entry in live if id(entry[0]) in ran]
            if not live:
                break
        rows = []
        for _, conn, case, _ in live:
            conn.send(("finish", None))
            rows.append({**_expect(conn, "row", case), "status": "ok"})
        return rows + [{**case, "status": "oom", "error": msg} for case, msg in failed]
    finally:
        for proc, conn, _ in procs:
            conn.close()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()


def _survivors(entries, what: str, failed: list, step: int | None = None) -> list[tuple]:
    """One process at a time: (tell it to run ``step`` and) wait for ``what``; returns
    ``(proc, conn, case, value)`` of those that did not run out of memory."""
    live = []
    for proc, conn, case, *_ in entries:
        if step is not None:
            conn.send(("step", step))
        try:
            live.append((proc, conn, case, _expect(conn, what, case)))
        except _OutOfMemory as exc:
            failed.append((case, str(exc)))
    if what == "ready" and len({entry[3] for entry in live}) > 1:
        raise RuntimeError("cases of one group disagree on the number of steps")
    return live


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_cases(cases: list[dict[str, Any]], log, side_by_side, checkpoint=None
              ) -> list[dict[str, Any]]:
    """Run every case in its own fresh process. The cases of one (part, model, workload,
    tasks) -- sweep cases join the main ones -- run side by side, alive together and taking
    turns (see `run_group`), when ``side_by_side(group)`` says so (a bool is taken as is),
    else one at a time (e.g. when their base copies would not fit in memory together).
    ``log`` gets one progress line per case; ``checkpoint(rows)``, if given, the rows so far
    after every group."""
    ctx = _context()
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for case in cases:
        part = case.get("part", "main")
        key = ("main" if part == "sweep" else part, case["model"], case["workload"],
               case["tasks"])
        groups.setdefault(key, []).append(case)
    together = side_by_side if callable(side_by_side) else (lambda group: side_by_side)
    runs = [g for group in groups.values()
            for g in ([group] if together(group) else [[case] for case in group])]
    rows, t_start, done = [], time.perf_counter(), 0
    for group in runs:
        for row in run_group(ctx, group):
            done += 1
            rows.append(row)
            if row["status"] != "ok":
                log(f"[{done}/{len(cases)}] {row['model']} {row['workload']} {row['tasks']:>2} "
                    f"tasks {row['system']:<16} OUT OF MEMORY: {row['error']}")
                continue
            log(f"[{done}/{len(cases)}] {row['model']} {row['workload']} {row['tasks']:>2} tasks "
                f"{row['system']:<16} {row['step_ms']:8.0f} ms/step {row['effective_tok_s']:8.0f}"
                f" eff tok/s  peak {row['peak_mem_mib']:7.0f} MiB  padding "
                f"{100 * row['ineffective_fraction']:4.1f}%  ({time.perf_counter() - t_start:.0f} s)")
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def base_copies(case: dict[str, Any]) -> int:
    """Base-model copies a case holds at once (muxc systems: while building, as N jobs)."""
    if case["system"] == "hf-multi-adapter":
        kinds = e2e_systems.workload_tasks(case["workload"], case["tasks"], "llama")
        return e2e_systems.HFMultiAdapter.base_copies(kinds)
    return case["tasks"]


def fits_side_by_side(group: list[dict[str, Any]], capacity_mib: float) -> bool:
    """Whether the base copies of every case of ``group`` take at most half of
    ``capacity_mib`` (the rest: activations, optimizer state, runtimes).

    >>> case = dict(model="llama-cpu", workload="nonuniform", tasks=8, system="muxc")
    >>> fits_side_by_side([case, case], capacity_mib=1000), fits_side_by_side([case], 100)
    (True, False)
    """
    weights = e2e_systems.MODELS[group[0]["model"]].weight_mib()
    return sum(base_copies(c) for c in group) * weights <= capacity_mib / 2


def _capacity_mib(device: torch.device) -> float:
    """Memory the worker processes of one group may share: the GPU's, or the host's
    available memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -------------------------------------------------------------------------------- metadata


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load() -> str:
    """The machine's 1/5/15-minute load averages and its CPU count (others share the cores)."""
    import os

    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} CPUs"


def _meta(device: torch.device, argv: list[str], wall_s: float) -> dict[str, Any]:
    import peft
    import transformers

    import muxc

    info = harness.machine(device)
    return {
        **info,
        "commit": _git("rev-parse", "--short", "HEAD") or info["commit"],
        "dirty": bool(_git("status", "--porcelain", "--", "muxc", "bench/*.py")),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "muxc_options_fields": " ".join(f.name for f in dataclasses.fields(muxc.Options)),
        "command": shlex.join(["muxc", "bench", "e2e", *argv]),
        "wall_s": wall_s,
    }


def _build_text(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    opts = {}
    for r in rows:
        opts.setdefault(r["system"], r["options"])
    has_chunk = "alignment" in meta["muxc_options_fields"].split()
    parts = [f"`muxc.Options` fields in this build: {meta['muxc_options_fields']}."]
    parts.append("Chunk alignment is available and muxc full runs with `alignment=chunk`."
                 if has_chunk else
                 "This build has NO `alignment` option: muxc full (`fusion=auto`) runs like "
                 "spatial with every task padded to the step's longest sequence.")
    parts += [f"{s}: `{o}`." for s, o in opts.items()]
    return " ".join(parts)


def _setup_text(args, device: torch.device) -> str:
    threads = (f"{args.threads} CPU intra-op thread(s) (on this 2-vCPU VM 2 threads made step "
               "times erratic; every system runs with the same setting)"
               if device.type == "cpu" else "bf16 base weights (PEFT keeps adapters in fp32)")
    memory = ("peak RSS (VmHWM, reset after setup) minus the RSS measured after imports, before "
              "any model is built" if device.type == "cpu" else
              "torch.cuda.max_memory_allocated (reset after setup) minus memory allocated "
              "before any model is built")
    clock = ("Step time = CPU time of the worker process (`time.process_time`; with one "
             "intra-op thread that is the step's own compute): this VM's 2 vCPUs are shared "
             "with other jobs and wall time swung up to 2x between identical steps. Wall-clock "
             "medians (`time.perf_counter`) are in the `wall step ms` column and the CSV."
             if device.type == "cpu" and args.threads == 1 else
             "Step time = wall clock (`time.perf_counter`, CUDA synchronised).")
    together = ("run side by side" if device.type == "cpu" else
                "run side by side when their base copies fit in half the GPU's memory (else "
                "one at a time)")
    return (f"{clock} {args.rows} samples per task per step, {args.warmup} warm-up + "
            f"{args.steps} timed steps per case (medians), {threads}. Every case runs in a "
            "fresh process; the systems of one (model, workload, tasks), fixed configurations "
            f"included, {together} and take turns step by step (rotating who goes first), so "
            f"load from elsewhere on the machine hits them alike. Peak memory = {memory}, i.e. "
            "during training, after building and compiling. "
            "`setup peak` is the peak while building (muxc systems build N PeftModels over N base "
            "copies, as separate jobs would, then compile keeps one copy and the others are "
            "freed). Effective tokens = non-padding tokens; raw tokens = all tokens the system "
            "computes (for muxc from `program.explain(batches).padding`).")


# -------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="muxc bench e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="llama, non-uniform, 2 and 8 tasks, reduced sweep and memory part")
    ap.add_argument("--parts", type=_parts, default=PARTS,
                    help=f"comma list of {','.join(PARTS)} (default: all)")
    ap.add_argument("--memory-large", dest="parts", action="store_const",
                    const=("memory-large",),
                    help="only the weights-dominant memory part (same as --parts memory-large)")
    ap.add_argument("--memory-model", default=None,
                    help="model of the memory part (default llama-large; GPU llama-large-gpu)")
    ap.add_argument("--fixed-chunks", type=lambda s: tuple(int(x) for x in s.split(",")),
                    default=None, help="chunk sizes of the fixed-configuration sweep "
                    f"(default {','.join(map(str, e2e_systems.FIXED_CHUNKS))}; --quick "
                    f"{','.join(map(str, QUICK_FIXED_CHUNKS))})")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--models", type=lambda s: s.split(","), default=None,
                    help="comma list of bench.e2e_systems MODELS (default by device)")
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=None,
                    help="comma list of nonuniform,uniform")
    ap.add_argument("--tasks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma list of task counts (default 1,2,4,8,16; 32 too on GPU)")
    ap.add_argument("--systems", type=lambda s: s.split(","), default=None,
                    help="comma list of hf-separate,hf-multi-adapter,spatial,temporal,muxc")
    ap.add_argument("--rows", type=int, default=None, help="samples per task per step (4; GPU 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (lazy init)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    ap.add_argument("--budget-mib", type=float, default=None,
                    help="memory budget for `tasks fit` (default: hf-separate's 8-task peak)")
    ap.add_argument("--cost-model", default=None, metavar="PATH|none",
                    help="on-device cost profile muxc full plans with (default "
                         "<out>/cost-profile-<device>.json, shared with bench.plan; keys it "
                         "lacks are measured before the cases, in a process of its own; "
                         "'none': the roofline default)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled step of the 8-task non-uniform cases")
    ap.add_argument("--append", action="store_true",
                    help="merge with the rows already in the output CSV (a newer row replaces "
                         "one with the same model/workload/tasks/system): split long GPU runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=harness.RESULTS,
                    help="directory for e2e-<device>[-quick].csv/.md/.png")
    return ap.parse_args(argv)


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(text.split(","))
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; parts: {','.join(PARTS)}")
    return parts


def _cost_model(args, device: torch.device) -> str:
    """The profile path muxc full plans with ("" for the roofline: ``--cost-model none``)."""
    if args.cost_model is None:
        return str(Path(args.out) / f"cost-profile-{harness.device_slug(device)}.json")
    return "" if args.cost_model.lower() == "none" else args.cost_model


def _cases(args, device: torch.device) -> list[dict[str, Any]]:
    """Every case of the asked parts, in run order: main (+ sweep at the headline count),
    memory-large, compile."""
    cpu = device.type == "cpu"
    common = dict(device=device.type, seed=args.seed, threads=args.threads if cpu else 0,
                  cost_model=_cost_model(args, device))
    main = plan(args.quick, device.type, args.models, args.workloads, args.tasks, args.systems)
    first_model = main[0][0] if main else None
    headline = max((n for *_, n, _ in main if n <= HEADLINE_TASKS), default=None)
    cases = []
    for model, workload, n, system in main:
        profile = (not args.no_profile and model == first_model and workload == "nonuniform"
                   and n == HEADLINE_TASKS)
        if "main" in args.parts:
            cases.append(dict(model=model, workload=workload, tasks=n, system=system,
                              rows=args.rows, steps=args.steps, warmup=args.warmup,
                              profile=profile, **common))
    if "sweep" in args.parts and headline is not None:  # joins the main group of its tasks
        chunks = args.fixed_chunks or (QUICK_FIXED_CHUNKS if args.quick
                                       else e2e_systems.FIXED_CHUNKS)
        workloads = dict.fromkeys(w for m, w, *_ in main if m == first_model)
        cases += [dict(model=first_model, workload=workload, tasks=headline, system=fixed,
                       part="sweep", rows=args.rows, steps=args.steps, warmup=args.warmup,
                       **common)
                  for workload in workloads for fixed in e2e_systems.fixed_systems(chunks)]
    if "memory-large" in args.parts:
        systems = args.systems or (MEMORY_QUICK_SYSTEMS if args.quick else e2e_systems.SYSTEMS)
        model = args.memory_model or MEMORY_MODEL[device.type]
        cases += [dict(model=model, workload=MEMORY_WORKLOAD, tasks=n,
                       system=system, part="memory-large", rows=2 if cpu else 4, steps=1,
                       warmup=1, steady_peak=True, strict_malloc=cpu, **common)
                  for n in MEMORY_TASKS[args.quick] for system in systems]
    if "compile" in args.parts:
        cases += [dict(model=COMPILE_MODEL, workload="uniform", tasks=n, system="muxc",
                       part="compile", rows=2, steps=1, warmup=0, **{**common, "cost_model": ""})
                  for n in COMPILE_TASKS]
    return cases


def _side_by_side(device: torch.device):
    """Which groups run side by side: main and sweep always on CPU (the models are small), the
    memory part never on CPU (N copies of 477 MiB per system) and, on a GPU, both when their
    base copies fit; compile cases always alone (their time is the measurement)."""
    capacity = _capacity_mib(device)

    def decide(group: list[dict[str, Any]]) -> bool:
        part = group[0].get("part", "main")
        if part == "compile" or (part == "memory-large" and device.type == "cpu"):
            return False
        return device.type == "cpu" or fits_side_by_side(group, capacity)

    return decide


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.e2e`` and ``muxc bench e2e``; progress to stderr, paths
    and the JSON to stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    device = resolve_device(args.device)
    if device is None:
        return 2
    args.rows = args.rows or (8 if device.type == "cuda" else 4)
    args.steps = args.steps or (5 if device.type == "cuda" else 3)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cases = _cases(args, device)
    print(f"muxc bench e2e: {len(cases)} cases on {harness.device_name(device)}, each in a "
          "fresh process", file=sys.stderr)
    slug = harness.device_slug(device) + ("-quick" if args.quick else "")
    partial = args.out / f"e2e-{slug}.partial.csv"
    load_before = _load()
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    warm_profiles(cases, log)
    rows = run_cases(cases, log=log,
                     side_by_side=_side_by_side(device),
                     checkpoint=lambda rows: harness.write_csv(rows, partial))
    meta = _meta(device, argv, time.perf_counter() - t0)
    meta["load"] = f"{load_before} before, {_load()} after"
    rc = _write(rows, meta, args, device, slug)
    partial.unlink(missing_ok=True)
    return rc


def _write(rows, meta, args, device: torch.device, slug: str) -> int:
    profile = [{"system": r["system"], **r.pop("profile_ms")} for r in rows if "profile_ms" in r]
    for r in rows:
        r.update({k: meta[k] for k in ("host", "device", "torch", "transformers", "peft",
                                       "commit", "dirty", "timestamp")}, device_type=device.type)
    csv_path = args.out / f"e2e-{slug}.csv"
    if args.append and csv_path.exists():
        rows = _merge(_read_csv(csv_path), rows)
        meta["command"] += " (merged with earlier rows of the CSV)"
    harness.write_csv(rows, csv_path)
    ok = [r for r in rows if r["status"] == "ok"]
    summary = e2e_report.headline(ok, device.type, HEADLINE_TASKS)
    main_rows = e2e_report.part_rows(ok, "main")
    budgets = e2e_report.budget_rows(main_rows + e2e_report.part_rows(ok, "memory-large"),
                                     args.budget_mib, HEADLINE_TASKS)
    weights = {m: e2e_systems.MODELS[m].weight_mib() for m in {r["model"] for r in ok}}
    plots = []
    notes = e2e_report.notes(ok, summary, budgets, device.type, weights)
    notes += [f"Out of memory: {r['model']} {r['workload']} {r['tasks']} tasks {r['system']} "
              f"({r['error']})." for r in rows if r["status"] != "ok"]
    memory_rows = main_rows + e2e_report.part_rows(ok, "memory-large")
    for metric, label, suffix, plotted in (
            ("effective_tok_s", "effective tokens/s", "throughput", main_rows),
            ("peak_mem_mib", "peak memory (MiB)", "memory", memory_rows)):
        png = args.out / f"e2e-{slug}-{suffix}.png"
        title = f"muxc e2e: {label}, {meta['device']}"
        if not plotted:
            continue
        missing = e2e_report.plot(plotted, metric, label, png, title)
        if missing:
            notes.append(missing)
        else:
            plots.append(png)
    meta["build"] = _build_text(ok, meta)
    meta["setup"] = _setup_text(args, device)
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(e2e_report.markdown(ok, meta=meta, summary=summary, budgets=budgets,
                                           profile=profile, notes=notes, plots=plots))
    for path in (csv_path, md_path, *plots):
        print(f"wrote {path}")
    for note in notes:
        print(f"- {note}")
    print(json.dumps(summary))
    return 0


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier results CSV, with numbers and booleans parsed back."""
    import csv

    def parse(v: str):
        if v in ("True", "False"):
            return v == "True"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with path.open() as f:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows not re-measured in ``new``, then ``new`` (rows of CSVs from before the
    ``part`` column count as ``main``)."""
    def key(r: dict[str, Any]) -> tuple:
        return (r.get("part", "main"), r.get("model"), r.get("workload"), r.get("tasks"),
                r.get("system"))

    seen = {key(r) for r in new}
    return [r for r in old if key(r) not in seen] + new


if __name__ == "__main__":
    sys.exit(main())
