"""``python -m bench.memory``: peak memory and time of one training step, side by side.

Systems (`SYSTEMS`, a list: add one by appending a `System`): HF PEFT with one model per task,
one HF model holding every task's adapter, HF with gradient checkpointing, and muxc with each
recompute mode (and compiled from a checkpointing-enabled model, default options). Each
(system, task count) runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0`` so RSS follows live tensors; one warm-up step, then RSS
(``/proc/self/statm``) is sampled in a thread during one forward+backward:

- ``step_peak_mib``: peak RSS during the step minus RSS just before it (activations and
  temporaries; weights, adapter grads and the compiled program are already there);
- ``total_mib``: peak RSS during the step minus RSS after imports (what the system needs);
- ``step_s``: wall time of the measured step (one torch thread; other jobs share the CPUs,
  so times are noisy: compare them within one run).

Tasks within a memory budget: ``total_mib`` fitted as ``a + b * tasks`` over the task counts
measured, solved for the budget. Writes ``bench/results/memory-<device>.csv``, ``.md``, ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import harness
from bench.e2e_report import fit_line, tasks_within_budget
from bench.e2e_systems import ModelSpec

__all__ = ["main", "SYSTEMS", "System", "MODELS"]

MODELS = {
    # the setting: fp32 Llama, hidden 256, 6 layers, 8 x 512 tokens per task
    "llama-h256": ModelSpec(name="llama-h256", family="llama", hidden=256, layers=6, heads=4,
                            kv_heads=4, vocab=1024, intermediate=1024),
    "llama-tiny": ModelSpec(name="llama-tiny", family="llama", hidden=64, layers=2, heads=4,
                            vocab=64, intermediate=128),  # smoke runs only
}
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
_TARGETS = ("q_proj", "v_proj")


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=list(_TARGETS), lora_dropout=0.0)


def _fp32_base(spec: ModelSpec) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(spec.config()).float()


BASES: dict[str, Callable[[ModelSpec], torch.nn.Module]] = {"fp32": _fp32_base}
"""How each base kind is built (e.g. a 4-bit base can be added here)."""


Step = Callable[[dict], None]


def _hf_separate(base, n: int, checkpointing: bool = False) -> Step:
    from peft import get_peft_model

    models = []
    for i in range(n):
        m = base if i == n - 1 else copy.deepcopy(base)  # n copies of the base in memory
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        models.append(get_peft_model(m, _lora()))

    def step(batches):
        for model, batch in zip(models, batches.values()):
            model(**batch).loss.backward()
    return step


def _hf_multi(base, n: int) -> Step:
    from peft import get_peft_model

    model = get_peft_model(base.train(), _lora(), adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", _lora())

    def step(batches):
        for name, batch in batches.items():
            model.set_adapter(name)
            model(**batch).loss.backward()
    return step


def _muxc(base, n: int, checkpointing: bool = False, **options) -> Step:
    from peft import get_peft_model

    import muxc

    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base.train(), _lora(), adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", _lora())
    tasks = [muxc.Task(name=f"t{i}", model=model, adapter_name=f"t{i}") for i in range(n)]
    program = muxc.compile(tasks, muxc.Options(**options))

    def step(batches):
        program.forward_backward(batches)
    return step


@dataclass(frozen=True)
class System:
    """One way to train the tasks: ``build(base, n)`` returns a function running one step."""

    name: str
    build: Callable[..., Step]
    what: str
    base: str = "fp32"
    kwargs: dict = field(default_factory=dict)


SYSTEMS: list[System] = [
    System("hf-separate", _hf_separate, "HF PEFT, one model per task"),
    System("hf-multi-adapter", _hf_multi, "one HF model, every task's adapter, one after another"),
    System("hf-checkpointing", _hf_separate, "HF PEFT, gradient_checkpointing_enable()",
           kwargs={"checkpointing": True}),
    System("muxc-none", _muxc, "muxc, recompute='none'", kwargs={"recompute": "none"}),
    System("muxc-layers", _muxc, "muxc, recompute='layers'", kwargs={"recompute": "layers"}),
    System("muxc-auto", _muxc, "muxc, recompute='auto'", kwargs={"recompute": "auto"}),
    System("muxc-from-hf-ckpt", _muxc, "muxc compiled from a checkpointing-enabled model, "
           "default options", kwargs={"checkpointing": True}),
]


# ------------------------------------------------------------------ one measurement


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler(threading.Thread):
    """Samples RSS every 0.5 ms until stopped; ``peak`` is the highest seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_mib()
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.0005)


def _batches(spec: ModelSpec, n: int, rows: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(n):
        ids = torch.randint(3, spec.vocab, (rows, seq), generator=g)
        out[f"t{i}"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return out


def _worker(system: str, model: str, n: int, rows: int, seq: int) -> dict:
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imports before the baseline)
    import peft  # noqa: F401

    import muxc  # noqa: F401

    sys_ = next(s for s in SYSTEMS if s.name == system)
    spec = MODELS[model]
    start = _rss_mib()
    base = BASES[sys_.base](spec)
    step = sys_.build(base, n, **sys_.kwargs)
    batches = _batches(spec, n, rows, seq)
    step(batches)  # warm-up: adapter grads allocated, kernels chosen
    gc.collect()
    before = _rss_mib()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    step(batches)
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    peak = max(sampler.peak, _rss_mib())
    return {"system": system, "base": sys_.base, "model": model, "tasks": n,
            "tokens_per_task": rows * seq, "step_peak_mib": round(peak - before, 1),
            "total_mib": round(peak - start, 1), "step_s": round(seconds, 3)}


def _run(system: str, model: str, n: int, rows: int, seq: int) -> dict:
    args = [sys.executable, "-m", "bench.memory", "--worker",
            json.dumps([system, model, n, rows, seq])]
    env = {**os.environ, **_ENV}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{system} x{n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report


def _report(rows: list[dict], budget: float, meta: dict) -> tuple[list[dict], list[str]]:
    one = {r["system"]: r for r in rows if r["tasks"] == 1}
    hf, ck, none = one.get("hf-separate"), one.get("hf-checkpointing"), one.get("muxc-none")
    table = []
    for s in SYSTEMS:
        if s.name not in one:
            continue
        r = one[s.name]
        pts = [(x["tasks"], x["total_mib"]) for x in rows if x["system"] == s.name]
        a, b = fit_line(pts)
        table.append({
            "system": s.name, "what": s.what, "step_peak_mib": r["step_peak_mib"],
            "vs_hf": r["step_peak_mib"] / hf["step_peak_mib"] if hf else None,
            "vs_hf_ckpt": r["step_peak_mib"] / ck["step_peak_mib"] if ck else None,
            "step_s": r["step_s"], "time_vs_muxc_none": r["step_s"] / none["step_s"] if none else None,
            "mib_per_task": b, f"tasks_in_{budget:.0f}_mib": tasks_within_budget(a, b, budget),
        })
    notes = []
    by = {t["system"]: t for t in table}
    if "muxc-layers" in by and ck:
        v = by["muxc-layers"]["vs_hf_ckpt"]
        notes.append(f"muxc recompute='layers' step peak = {v:.2f}x HF with checkpointing "
                     f"(target <= 1.15x): {'met' if v <= 1.15 else 'NOT met'}")
    if "muxc-from-hf-ckpt" in by and ck:
        v = by["muxc-from-hf-ckpt"]["vs_hf_ckpt"]
        notes.append(f"muxc compiled from the checkpointing model (default options) = {v:.2f}x "
                     "HF with checkpointing")
    if "muxc-auto" in by and hf and none:
        m, t = by["muxc-auto"]["vs_hf"], by["muxc-auto"]["time_vs_muxc_none"]
        notes.append(f"muxc recompute='auto' step peak = {m:.2f}x HF (target <= 0.5x: "
                     f"{'met' if m <= 0.5 else 'NOT met'}), step time = {t:.2f}x muxc 'none' "
                     f"(target <= 1.3x: {'met' if t <= 1.3 else 'NOT met'})")
    counts = sorted({r["tasks"] for r in rows})
    notes.append(f"tasks_in_*: a line fit of total_mib over {counts} tasks, solved for the budget: "
                 "an extrapolation. HF runs tasks one after another and muxc's fusion='auto' ran "
                 "these two equal tasks one after another too, so activations do not grow with "
                 "tasks; the slope is then a few MiB of adapter state plus RSS noise (about 1 MiB),"
                 " so only the order of magnitude means something")
    notes.append(f"machine: {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, "
                 f"{meta['timestamp']}; step times taken with one torch thread while other jobs "
                 "shared the 2 CPUs (noisy; memory is not)")
    return table, notes


def _read_csv(path: Path) -> list[dict]:
    import csv

    def value(k, v):
        if k in ("tasks", "tokens_per_task"):
            return int(v)
        if k in ("step_peak_mib", "total_mib", "step_s"):
            return float(v)
        return v
    with path.open() as f:
        return [{k: value(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def _plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["system"] for t in table]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.barh(names, [t["step_peak_mib"] for t in table], color="tab:blue")
    ax1.set_xlabel("peak memory added by one step (MiB)")
    ax1.invert_yaxis()
    ax2.barh(names, [t["step_s"] for t in table], color="tab:orange")
    ax2.set_xlabel("step time (s, 1 thread, shared CPU)")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-h256", choices=sorted(MODELS))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tasks", default="1,2", help="task counts to measure (for the budget fit)")
    p.add_argument("--systems", default=",".join(s.name for s in SYSTEMS))
    p.add_argument("--budget-mib", type=float, default=2048.0)
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md and .png from the existing CSV, measuring nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*json.loads(args.worker))))
        return 0
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    stem = out / "memory-cpu"
    if args.report_only:
        rows = _read_csv(stem.with_suffix(".csv"))
        meta = {k: rows[0][k] for k in ("device", "torch", "commit", "timestamp")}
    else:
        rows = []
        for n in [int(x) for x in args.tasks.split(",")]:  # systems take turns: a load change
            for name in args.systems.split(","):           # hits them all alike
                r = _run(name, args.model, n, args.rows, args.seq)
                print(f"{name:>20} x{n}: step peak {r['step_peak_mib']:8.1f} MiB, total "
                      f"{r['total_mib']:8.1f} MiB, step {r['step_s']:.2f} s", flush=True)
                rows.append(r)
        meta = harness.machine(torch.device("cpu"))
        rows = [{**r, **meta} for r in rows]
        harness.write_csv(rows, stem.with_suffix(".csv"))
    table, notes = _report(rows, args.budget_mib, meta)
    cols = list(table[0])
    spec = MODELS[args.model]
    title = (f"{spec.name}: fp32 Llama h{spec.hidden} x {spec.layers} layers, one LoRA task "
             f"(r8, q/v), {args.rows} x {args.seq} tokens")
    md = [f"# One training step: peak memory and time\n\n{title}. Command: `python -m bench.memory`"
          " (defaults).\n", harness.markdown_table(table, cols), "",
          *[f"- {n}" for n in notes], "", "Definitions: see the docstring of `bench/memory.py`.", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    _plot(table, stem.with_suffix(".png"), title)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
