"""Memory on a 4-bit base (QLoRA): N tasks on ONE shared NF4 base (muxc) against N separate
QLoRA models (HF PEFT, one per task), and the tasks each fits in a memory budget.

Each system runs in its own child process (``python -m bench.memory_qlora --child ...``) with
glibc told to return freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so
its resident set follows live tensors; a thread samples RSS (``/proc/self/statm``) every
millisecond. Reported per system and task count, in MiB above the process after imports:

- ``resident``: after loading every task's model (each from the checkpoint, as separate users
  do; its tensors copied off the file's mmap, which would otherwise stay resident per model,
  as they would be by a move to the GPU), compiling (muxc re-points duplicate base tensors at one copy) and one warm-up step;
- ``peak``: the highest RSS during one more training step of every task (HF: one after the
  other, as separate jobs on one machine at best would; muxc-temporal: one hTask per task,
  interleaved, so one task's activations live at a time; muxc-spatial: all tasks' tokens in
  one fused step, so every task's activations live at once);
- ``step_s``: that step's wall time.

Tasks per budget come from two measured points per system (1 and N tasks): fixed memory
``f`` and per-task memory ``m`` of the line through them; a budget ``B`` fits
``floor((B - f) / m)`` tasks (the HF line has f ~ 0: each task brings its own base).
The base is built to make weights dominate (a tiny batch), the regime the target names.

    python -m bench.memory_qlora                 # writes bench/results/memory-qlora-cpu.{csv,md}
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import RESULTS, machine, markdown_table, write_csv

# hidden 1024 x 8 layers (88M linear params: 42 MiB in NF4), vocab 2048; 1 x 32 tokens per task
CONFIG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
ROWS, SEQ = 1, 32
SYSTEMS = ("hf-separate", "muxc-temporal", "muxc-spatial")


class _Sampler:
    """Peak resident set of this process, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> _Sampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _child(system: str, tasks: int, ckpt: str) -> dict:
    """One system's measurements (runs in the child process)."""
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import muxc

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sampler = _Sampler()
    base_rss = sampler.rss()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_compute_dtype=torch.float32)
    models = []
    for _ in range(tasks):
        m = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=qc, device_map="cpu",
                                                 dtype=torch.float32)
        with torch.no_grad():  # off the checkpoint's mmap, as a copy to the GPU would be: else
            for p in m.parameters():  # every model keeps ~the file's size of mapped pages
                p.data = p.data.clone()
        pm = get_peft_model(m, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        models.append(pm.train())
    g = torch.Generator().manual_seed(1)
    batches = {}
    for i in range(tasks):
        ids = torch.randint(3, CONFIG["vocab_size"], (ROWS, SEQ), generator=g)
        batches[f"t{i}"] = {"input_ids": ids, "labels": ids.clone()}
    if system.startswith("muxc"):
        program = muxc.compile([muxc.Task(name=f"t{i}", model=m) for i, m in enumerate(models)],
                               muxc.Options(fusion=system.removeprefix("muxc-")))

        def step():
            program.step(batches)
    else:
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                for m in models]

        def step():
            for i, (m, opt) in enumerate(zip(models, opts)):
                m(**batches[f"t{i}"]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on
    gc.collect()
    resident = sampler.rss() - base_rss
    with sampler:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    return {"resident_mib": resident / 2**20, "peak_mib": (sampler.peak - base_rss) / 2**20,
            "step_s": seconds}


def _run_child(system: str, tasks: int, ckpt: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory_qlora", "--child", system, str(tasks), ckpt],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fits(fixed: float, per_task: float, budget: float) -> int:
    return max(0, math.floor((budget - fixed) / per_task)) if per_task > 0 else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--budget-mib", type=float, default=1024.0,
                    help="memory budget the tasks-per-budget column uses")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=3, metavar=("SYSTEM", "TASKS", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        system, tasks, ckpt = args.child
        print(json.dumps(_child(system, int(tasks), ckpt)))
        return 0

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(tmp)
        for system in SYSTEMS:
            points = {}
            for n in (1, args.tasks):
                r = _run_child(system, n, tmp)
                points[n] = r
                rows.append({"system": system, "tasks": n, **{k: round(v, 3) for k, v in r.items()}})
                print(f"{system:12s} tasks={n}: resident {r['resident_mib']:.1f} MiB, peak "
                      f"{r['peak_mib']:.1f} MiB, step {r['step_s']:.2f} s", flush=True)
            lo, hi = points[1]["peak_mib"], points[args.tasks]["peak_mib"]
            per_task = (hi - lo) / (args.tasks - 1)
            fixed = lo - per_task
            for row in rows[-2:]:
                row.update(fixed_mib=round(fixed, 1), per_task_mib=round(per_task, 2),
                           budget_mib=args.budget_mib,
                           tasks_in_budget=_fits(fixed, per_task, args.budget_mib))
    facts = machine(torch.device("cpu"))
    for row in rows:
        row.update(facts)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "memory-qlora-cpu.csv")
    fit = {r["system"]: r["tasks_in_budget"] for r in rows}
    sep = fit["hf-separate"]
    summary = ", ".join(f"{s} {fit[s]} ({fit[s] / sep:.1f}x)" for s in SYSTEMS[1:]) if sep else ""
    cols = ["system", "tasks", "resident_mib", "peak_mib", "step_s", "fixed_mib",
            "per_task_mib", "tasks_in_budget"]
    text = (f"# QLoRA memory: {args.tasks} tasks on one NF4 base vs separate QLoRA models (CPU)\n\n"
            f"Llama {CONFIG['hidden_size']} x {CONFIG['num_hidden_layers']} layers, vocab "
            f"{CONFIG['vocab_size']}, NF4 (fp32 compute), LoRA r=8 on q/v, AdamW, {ROWS} x {SEQ} "
            f"tokens per task. MiB above the process after imports; tasks in a "
            f"{args.budget_mib:.0f} MiB budget from the 1- and {args.tasks}-task peaks.\n\n"
            + markdown_table(rows, cols)
            + f"\n\nTasks per budget: hf-separate {sep}; {summary}.\n")
    (args.out / "memory-qlora-cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
