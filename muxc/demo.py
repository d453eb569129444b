"""The embedded demo: 4 PEFT tasks of different types, ranks and lengths on one tiny Llama.

`run_demo` builds everything from configs (no downloads), compiles, trains, dumps, and returns
a `DemoResult`; the CLI prints it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muxc.api import compile
from muxc.explain import Explanation
from muxc.options import Options
from muxc.task import Task
from muxc.workloads import LENGTHS, Rule, SyntheticTask, sample_batch, tiny_llama_config

__all__ = ["DemoResult", "run_demo", "demo_tasks"]

VOCAB = 64


@dataclass
class DemoResult:
    losses: dict[str, list[float]]
    explanation: Explanation
    dump_paths: list[Path]
    adapter_paths: list[Path]
    compile_seconds: float
    train_seconds: float
    steps: int
    specs: dict[str, str] = field(default_factory=dict)


def demo_tasks(seed: int = 0):
    """(synthetic task, PEFT config, lr) for the four demo tasks."""
    from peft import IA3Config, LoraConfig

    return [
        (SyntheticTask("increment", Rule(1, 1), LENGTHS["sst2"]),
         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 2e-2),
        (SyntheticTask("stride3", Rule(1, 3), LENGTHS["obqa"]),
         LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0), 1e-2),
        (SyntheticTask("double", Rule(2, 0), LENGTHS["uniform"]),
         IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), 5e-2),
        (SyntheticTask("skip2", Rule(1, 2), LENGTHS["rte"]),
         LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0), 1e-2),
    ]


def run_demo(
    steps: int = 30,
    rows: int = 4,
    out_dir: str | Path = "out/demo",
    options: Options | None = None,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_progress: Callable[[str, int, int, str], None] | None = None,
) -> DemoResult:
    """Compile the four demo tasks and train them together for ``steps`` steps."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(hidden=64, layers=2, vocab=VOCAB)).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    spec = demo_tasks(seed)
    tasks, data = [], {}
    for synth, cfg, lr in spec:
        # one PeftModel per task over its own copy of the base, as separate jobs would have;
        # compile keeps ONE copy of the frozen weights (the copies are de-duplicated by value)
        model = get_peft_model(copy.deepcopy(base), cfg)
        tasks.append(Task(name=synth.name, model=model, lr=lr))
        data[synth.name] = synth
    t0 = time.perf_counter()
    program = compile(tasks, options or Options(fusion="auto", alignment="chunk"), on_progress=on_progress)
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed + 1)
    losses: dict[str, list[float]] = {t.name: [] for t in tasks}
    t0 = time.perf_counter()
    batches = None
    for step in range(steps):
        batches = {n: sample_batch(s, rows, VOCAB, gen) for n, s in data.items()}
        out = program.step(batches)
        for n, v in out.items():
            losses[n].append(float(v))
        if on_step is not None:
            on_step(step, {n: float(v) for n, v in out.items()})
    train_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    dumps = program.dump(out_dir / "dump", batches)
    adapters = program.save_adapters(out_dir / "adapters")
    return DemoResult(
        losses=losses,
        explanation=program.explain(batches),
        dump_paths=dumps,
        adapter_paths=adapters,
        compile_seconds=compile_s,
        train_seconds=train_s,
        steps=steps,
        specs={synth.name: f"{type(cfg).__name__.removesuffix('Config')} "
               f"{'r=' + str(cfg.r) if hasattr(cfg, 'r') else ''} len {synth.lengths[0]}-{synth.lengths[1]}".strip()
               for synth, cfg, _ in spec},
    )
