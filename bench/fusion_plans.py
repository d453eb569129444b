"""``python -m bench.fusion_plans``: muxc's own fusion plan against forced hTask groupings, side
by side in one process, predicted and measured.

One compiled program (``fusion="auto", alignment="chunk"``, the given cost profile) on
``--model`` with ``--tasks`` tasks of ``--workload``; every other configuration is the same
program (`Program.with_options`) whose planner memo holds a forced plan per batch set: hTasks
of the given sizes over the tasks in load order (as the fusion DP groups them), each hTask at
its own chunk size (`AutoFusion.group_chunks`). Steps interleave (every configuration runs
each step, the order reversed every other step) on one thread; step time is process CPU time;
medians of ``--steps`` timed steps after one warm-up per batch set. ``predicted``: the sum of
the plan's hTask costs (`StepPlan.costs`), the cost model's step time of that plan.

``--plans``: comma-separated groupings, ``2+2+2+2`` for every batch set or
``5+3/3+5/3+5`` one per batch set (``--batch-sets`` of them, cycled over the steps).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from bench import e2e_systems as es

__all__ = ["main"]


def _groups(order: list[str], sizes: list[int]) -> tuple[tuple[str, ...], ...]:
    if sum(sizes) != len(order):
        raise SystemExit(f"grouping {'+'.join(map(str, sizes))} does not cover {len(order)} tasks")
    out, i = [], 0
    for n in sizes:
        out.append(tuple(order[i:i + n]))
        i += n
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    from muxc.plan.fusion import loads_of
    from muxc.plan.step import _lengths_key, plan_step

    ap = argparse.ArgumentParser(prog="python -m bench.fusion_plans",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-large")
    ap.add_argument("--workload", default="nonuniform-short")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2, help="samples per task per step")
    ap.add_argument("--steps", type=int, default=9, help="timed steps (after the warm-up)")
    ap.add_argument("--batch-sets", type=int, default=3)
    ap.add_argument("--plans", default="1+1+1+1+1+1+1+1,2+2+2+2,4+4,3+5")
    ap.add_argument("--hf", action="store_true", help="also hf-separate (one base copy per task)")
    ap.add_argument("--cost-model", required=True, help="profile JSON (use a copy: it is updated)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    spec = es.MODELS[args.model]
    tasks = es.workload_tasks(args.workload, args.tasks, spec.family)
    batches = es.make_batches(tasks, args.batch_sets, args.rows, spec.vocab, 0)
    cpu = torch.device("cpu")
    program = es.build_system("muxc", spec, tasks, cpu, 0, args.cost_model).program
    configs: dict = {"auto": program}
    for text in filter(None, args.plans.split(",")):
        per_set = [[int(n) for n in part.split("+")] for part in text.split("/")]
        forced = program.with_options()
        planner = forced.planner
        for i, b in enumerate(batches):
            loads = loads_of(b)
            order = sorted(loads, key=lambda t: (loads[t][0], t))
            groups = _groups(order, per_set[i % len(per_set)])
            chunk = planner.chunk_size(b)
            chunks = planner.fusion.group_chunks(b, groups, chunk)
            planner._memo[_lengths_key(planner, b)] = plan_step(planner, b, groups, chunk, chunks)
        configs[text] = forced
    if args.hf:
        configs["hf-separate"] = es.build_system("hf-separate", spec, tasks, cpu, 0)

    predicted = {}
    for name, p in configs.items():
        if name == "hf-separate":
            continue
        rows = []
        for b in batches:
            plan = p.plan(b)
            rows.append(sum(c.micro_batches * (c.forward + c.backward) for c in plan.costs))
            held = max(c.activation_bytes * c.micro_batches for c in plan.costs) / 2**20
            sizes = "+".join(str(len(h)) for h in plan.htasks)
            print(f"{name:22s} plan {sizes:16s} chunks {'/'.join(map(str, plan.chunk_sizes))}: "
                  f"predicted {rows[-1] * 1e3:.0f} ms, largest hTask {held:.0f} MiB", flush=True)
        predicted[name] = statistics.median(rows)

    for b in batches:  # warm-up
        for p in configs.values():
            p.step(b)
    times: dict[str, list[float]] = {n: [] for n in configs}
    for i in range(args.steps):
        names = list(configs)[:: -1 if i % 2 else 1]
        for name in names:
            gc.collect()
            c0 = time.process_time()
            configs[name].step(batches[i % len(batches)])
            times[name].append(time.process_time() - c0)
        print(f"step {i}: " + " ".join(f"{n}={times[n][-1]:.2f}" for n in configs), flush=True)
    ref = next(iter(configs))
    print(f"\nmedians of {args.steps} steps (CPU s); ratio: median of per-step ratios to {ref}")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times[ref]))
        pred = f"{predicted[name]:.3f}" if name in predicted else "-"
        print(f"{name:22s} measured {statistics.median(ts):.3f}  predicted {pred}  "
              f"ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
