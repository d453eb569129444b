"""Processes of the multi-process pipeline tests: one per stage, over gloo on this machine.

Each process builds the same tiny base and tasks (same seeds), compiles with ``stages`` equal
to the group size, trains 3 steps, saves adapters, and reports its losses and how many GEMMs it
ran. Started with the ``spawn`` method by `run_group`.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch

STEPS = 3
MODES = {  # name -> Options keywords
    "spatial-pad": dict(fusion="spatial", alignment="pad"),
    "temporal-pad-mb2": dict(fusion="temporal", alignment="pad", micro_batches=2),
    "auto-chunk": dict(fusion="auto", alignment="chunk", chunk_size=4),
}


def task_specs(family: str):
    from models import build_base, make_peft
    from peft import IA3Config, LoraConfig

    base = build_base(family)
    qv = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}[family]
    return [
        ("r4", make_peft(base, LoraConfig(r=4, target_modules=qv, lora_dropout=0.0), 1)),
        ("r8", make_peft(base, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0), 2)),
        ("ia3", make_peft(base, IA3Config(), 3)),
    ]


def step_batches(step: int):
    from models import make_batch

    return {"r4": make_batch(2, 9, 10 + step), "r8": make_batch(3, 6, 20 + step, pad_rows=2),
            "ia3": make_batch(2, 11, 30 + step)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CountGemms(torch.utils._python_dispatch.TorchDispatchMode):
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.linear.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def compile_family(family: str, alignment: str, stages: int):
    """The three tasks of ``family`` compiled for ``alignment`` (fresh models)."""
    import muxc

    tasks = [muxc.Task(name=n, model=m) for n, m in task_specs(family)]
    program = muxc.compile(tasks, muxc.Options(stages=stages, alignment=alignment))
    program.initial_adapters = [(p, p.detach().clone()) for s in program.states.values() for p in s.params]
    return program


def _restart(program) -> None:
    """Back to the tasks' initial adapters and fresh optimizer states (as if just compiled)."""
    import torch

    with torch.no_grad():
        for p, init in program.initial_adapters:
            p.copy_(init)
    for state in program.states.values():
        state.optimizer.state.clear()
        state.optimizer.zero_grad(set_to_none=True)
        state.steps = 0


def train(family: str, mode: str, stages: int, out_dir: str | None, compiled=None):
    """Train the three tasks STEPS steps in ``mode`` (run-time options applied to ``compiled``,
    or a fresh compile); (losses per step, GEMMs of one step, program)."""
    options = dict(MODES[mode])
    alignment = options.pop("alignment")
    if compiled is None:
        compiled = compile_family(family, alignment, stages)
    else:
        _restart(compiled)
    program = compiled.with_options(**options)
    losses, gemms = [], 0
    for step in range(STEPS):
        with _CountGemms() as counter:
            out = program.step(step_batches(step))
        gemms = counter.count
        losses.append({t: float(v) for t, v in out.items()})
    if out_dir is not None:
        program.save_adapters(os.path.join(out_dir, f"{family}-{mode}"))
    return losses, gemms, program


def rank_main(rank: int, world: int, port: int, jobs, out_dir: str, queue, die_at) -> None:
    """One stage process: run ``jobs`` [(family, mode)], put results (or the error) on ``queue``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        results, compiled = {}, {}
        for family, mode in jobs:
            if die_at is not None:
                import time

                import muxc

                tasks = [muxc.Task(name=n, model=m) for n, m in task_specs(family)]
                program = muxc.compile(tasks, muxc.Options(stages=world, **MODES[mode]))
                program.step(step_batches(0))
                if rank == die_at:
                    os._exit(3)  # dies after one step: the others are mid-step when it is missed
                t0 = time.monotonic()
                try:
                    program.step(step_batches(1))
                except muxc.PipelineError as e:
                    queue.put((rank, "PipelineError", (str(e), time.monotonic() - t0)))
                    return
                raise AssertionError("the step after a rank died did not fail")
            alignment = MODES[mode]["alignment"]
            if (family, alignment) not in compiled:  # fresh models: training starts over
                compiled = {(family, alignment): compile_family(family, alignment, world)}
            losses, gemms, program = train(family, mode, world, out_dir, compiled[(family, alignment)])
            results[(family, mode)] = (losses, gemms)
            if rank == 0 and die_at is None:
                program.dump(os.path.join(out_dir, f"dump-{family}-{mode}"), step_batches(0))
        queue.put((rank, "ok", results))
        dist.destroy_process_group()
    except Exception as e:  # report, the parent asserts on it
        queue.put((rank, type(e).__name__, f"{e}\n{traceback.format_exc()}"))


def run_group(world: int, jobs, out_dir: str, die_at=None, timeout: float = 600.0):
    """Start ``world`` stage processes; {rank: (status, payload)}."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, jobs, out_dir, queue, die_at))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    expected = world - (1 if die_at is not None else 0)
    try:
        while len(out) < expected:
            rank, status, payload = queue.get(timeout=timeout)
            out[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out
