"""``python -m bench.compile``: compile time and retained memory for N equal-structure tasks.

N LoRA tasks of one structure (rank 8, q/v) on separate copies of one base, one thread, with
the trace cache on and off (off: every task exported, as before the cache; the baseline,
measured in the same run). Cold: the first compile in a fresh process (paying torch.export's
warm-up, as a user's first compile does), one process per N. Warm: one process compiles every
N in turn, ``--reps`` rounds, fastest per N (the rounds share the machine's load, so the
ratios to N=1 are fair on a shared machine). ``program_mib``: the RSS freed by dropping a
compiled program (its models kept; median; the workers run with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so freed memory is returned).

Writes ``bench/results/compile-<device>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import harness
from bench.e2e_systems import MODELS, ModelSpec

__all__ = ["main"]

# the tests' tiny Llama (tests/models.py): hidden 32, 2 layers
_TEST_LLAMA = ModelSpec(name="llama-test", family="llama", hidden=32, layers=2, heads=4,
                        kv_heads=2, vocab=96, intermediate=64)
_SPECS = {"llama-test": _TEST_LLAMA, "llama-cpu": MODELS["llama-cpu"]}
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tasks(base, n: int, tag: str):
    from peft import LoraConfig, get_peft_model

    import muxc

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return [muxc.Task(name=f"{tag}{i}", model=get_peft_model(copy.deepcopy(base), cfg)) for i in range(n)]


def _compile(muxc, tasks) -> tuple[float, float, str, float]:
    """Compile ``tasks``: (seconds, trace_tasks seconds, its notes, MiB the program held)."""
    import gc

    gc.collect()
    t0 = time.perf_counter()
    program = muxc.compile(tasks)
    seconds = time.perf_counter() - t0
    trace = next(r for r in program.history if r.name == "trace_tasks")
    gc.collect()
    with_program = _rss_mib()
    del program
    gc.collect()
    return seconds, trace.seconds, trace.summary.split("; [")[0], with_program - _rss_mib()


def _worker(model: str, reuse: bool, ns: list[int], reps: int, cold: bool) -> list[dict]:
    """In this fresh process: with ``cold``, one compile of ``ns[0]`` tasks (the process's first);
    else one warm-up compile, then ``reps`` rounds compiling each of ``ns`` in turn (so every N
    sees the same machine load), fastest per N."""
    import muxc
    from muxc.frontends import cache

    torch.set_num_threads(1)
    if not reuse:  # baseline: no two tasks ever share a signature, so every task is exported
        real = cache.trace_signature
        cache.trace_signature = lambda task, pos: (id(task), real(task, pos))
    base = _SPECS[model].build(torch.device("cpu"), seed=0)
    runs: dict[int, list] = {n: [] for n in ns}
    if cold:
        runs[ns[0]].append(_compile(muxc, _tasks(base, ns[0], "cold")))
    else:
        _compile(muxc, _tasks(base, 1, "warmup"))
        for rep in range(reps):
            for n in ns:
                runs[n].append(_compile(muxc, _tasks(base, n, f"r{rep}_")))
    rows = []
    for n, got in runs.items():
        if not got:
            continue
        fastest = min(got, key=lambda r: r[0])
        rows.append({
            "model": model, "tasks": n, "reuse": "on" if reuse else "off",
            "s": round(fastest[0], 3), "trace_s": round(fastest[1], 3), "notes": fastest[2],
            "program_mib": round(statistics.median(r[3] for r in got), 1),
        })
    return rows


def _run(args: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "bench.compile", *args]
    out = subprocess.run(cmd, env={**os.environ, **_ENV}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Entry point; progress to stderr, the rows as JSON to stdout."""
    ap = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-test,llama-cpu")
    ap.add_argument("--tasks", default="1,4,16")
    ap.add_argument("--reps", type=int, default=3, help="warm rounds (the fastest is reported)")
    ap.add_argument("--out", type=Path, default=harness.RESULTS)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "REUSE", "NS"), help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model, reuse, ns = args.worker
        ns = [int(n) for n in ns.split(",")]
        print(json.dumps(_worker(model, reuse == "on", ns, args.reps, args.cold)))
        return 0
    torch.set_num_threads(1)  # the workers run one thread; the machine facts say so
    rows = []
    for model in args.models.split(","):
        for reuse in ("on", "off"):
            print(f"compile: {model} reuse={reuse}: warm rounds over {args.tasks}", file=sys.stderr)
            warm = _run(["--reps", str(args.reps), "--worker", model, reuse, args.tasks])
            for w in warm:
                print(f"compile: {model} reuse={reuse}: cold x{w['tasks']}", file=sys.stderr)
                (c,) = _run(["--cold", "--worker", model, reuse, str(w["tasks"])])
                rows.append({
                    "model": model, "tasks": w["tasks"], "reuse": reuse, "cold_s": c["s"],
                    "cold_trace_s": c["trace_s"], "warm_s": w["s"], "warm_trace_s": w["trace_s"],
                    "program_mib": w["program_mib"], "notes": w["notes"],
                })
    facts = harness.machine(torch.device("cpu"))
    for r in rows:
        one = next(x for x in rows if (x["model"], x["reuse"], x["tasks"]) == (r["model"], r["reuse"], 1))
        r["cold_vs_1"] = round(r["cold_s"] / one["cold_s"], 2)
        r["warm_vs_1"] = round(r["warm_s"] / one["warm_s"], 2)
        r.update(facts)
    slug = harness.device_slug(torch.device("cpu"))
    harness.write_csv(rows, args.out / f"compile-{slug}.csv")
    cols = ["model", "tasks", "reuse", "cold_s", "cold_trace_s", "cold_vs_1", "warm_s", "warm_trace_s",
            "warm_vs_1", "program_mib", "notes"]
    md = (f"# Compile time, N equal-structure tasks ({facts['device']}, torch {facts['torch']}, "
          f"{facts['timestamp']})\n\n{harness.markdown_table(rows, cols)}\n")
    (args.out / f"compile-{slug}.md").write_text(md)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
