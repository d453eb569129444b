"""What `muxc bench e2e` measures: the workloads, the five systems, and one measured case.

Used by `bench.e2e`. Everything here runs inside ONE fresh worker process per case, so the
process's peak memory is that case's alone.

Workloads (synthetic tokens, fixed seeds, no downloads):

- ``uniform``: every task draws lengths from one distribution (40-80 tokens) and trains the
  same adapter shape (LoRA r=8 on the attention projections);
- ``nonuniform``: tasks cycle through SST-2-like (10-60), RTE-like (50-250) and
  OpenBookQA-like (30-120) lengths and through LoRA r=4 (attention), LoRA r=16 (all linears),
  IA3 and LoRA r=8 (MLP).

Systems (each trains every task on the same batches, one optimizer step per task per step):

1. ``hf-separate``: one PeftModel over its own base copy per task, tasks one after another,
   each batch padded to its own longest sample (what the usual collator gives);
2. ``hf-multi-adapter``: one PeftModel per adapter *type* holding every task's adapter of that
   type, switching the active adapter per task (PEFT cannot mix LoRA and IA3 in one model, so
   the non-uniform workload keeps two base copies: one for the LoRA tasks, one for IA3);
3. ``spatial``: muxc ``fusion="spatial"`` (+ ``alignment="pad"`` where the build has it);
4. ``temporal``: muxc ``fusion="temporal"``;
5. ``muxc``: muxc ``fusion="auto"`` (+ ``alignment="chunk"`` where the build has it).

Fixed configurations (the sweep that ``muxc``'s automatic choice is judged against): muxc with
``fusion`` spatial or temporal and ``alignment="chunk"`` at a fixed ``chunk_size``, named like
``temporal-chunk32`` (`fixed_systems`); with ``spatial`` and ``temporal`` (alignment pad) they
make the fixed grid.

Workload ``nonuniform-short`` is ``nonuniform`` (same adapters) with about a quarter of the
lengths: for the weights-dominant memory runs (``llama-large``), where a step must stay short.

>>> [t.name for t in workload_tasks("nonuniform", 4, "llama")]
['t00-sst2-lora4', 't01-rte-lora16', 't02-obqa-ia3', 't03-sst2-lora8']
>>> fixed_systems((32, 64))
('spatial-chunk32', 'spatial-chunk64', 'temporal-chunk32', 'temporal-chunk64')
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from muxc.workloads import LENGTHS, Rule, SyntheticTask, sample_batch

__all__ = [
    "SYSTEMS",
    "FIXED_CHUNKS",
    "fixed_systems",
    "ModelSpec",
    "TaskSpec",
    "WORKLOADS",
    "Case",
    "MODELS",
    "workload_tasks",
    "make_batches",
    "muxc_options",
    "CaseRun",
    "run_case",
]

SYSTEMS = ("hf-separate", "hf-multi-adapter", "spatial", "temporal", "muxc")
"""Benchmark systems, in table order (see module doc)."""
FIXED_CHUNKS = (16, 32, 64, 128)
"""Chunk sizes of the fixed-configuration sweep (the full run; ``--quick`` takes fewer)."""


def fixed_systems(chunks: tuple[int, ...] = FIXED_CHUNKS) -> tuple[str, ...]:
    """The fixed chunk-aligned muxc configurations: fusion spatial/temporal x ``chunks``."""
    return tuple(f"{fusion}-chunk{c}" for fusion in ("spatial", "temporal") for c in chunks)


Batch = dict[str, torch.Tensor]
Step = dict[str, Batch]


@dataclass(frozen=True)
class ModelSpec:
    """A base model built from a config (no downloads)."""

    name: str
    family: str  # "llama" | "gpt2"
    hidden: int
    layers: int
    heads: int
    vocab: int
    intermediate: int = 0  # llama MLP width (0: 8/3 * hidden rounded to 64)
    kv_heads: int = 0  # llama grouped-query heads (0: heads // 2)
    dtype: str = "float32"

    def config(self):
        """The HF config of this model."""
        from transformers import GPT2Config, LlamaConfig

        if self.family == "gpt2":
            return GPT2Config(
                vocab_size=self.vocab, n_embd=self.hidden, n_layer=self.layers, n_head=self.heads,
                n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=1, eos_token_id=2, use_cache=False,
            )
        inter = self.intermediate or (8 * self.hidden // 3 + 63) // 64 * 64
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=inter,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or max(1, self.heads // 2),
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            use_cache=False,
        )

    def build(self, device: torch.device, seed: int) -> torch.nn.Module:
        """A frozen base in eval mode on ``device`` (same weights for the same seed)."""
        from transformers import GPT2LMHeadModel, LlamaForCausalLM

        cls = GPT2LMHeadModel if self.family == "gpt2" else LlamaForCausalLM
        torch.manual_seed(seed)
        model = cls(self.config()).to(device=device, dtype=getattr(torch, self.dtype)).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def weight_mib(self) -> float:
        """MiB of one copy of this model's weights (counted on the meta device)."""
        from transformers import GPT2LMHeadModel, LlamaForCausalLM

        cls = GPT2LMHeadModel if self.family == "gpt2" else LlamaForCausalLM
        with torch.device("meta"):
            model = cls(self.config())
        itemsize = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return sum(p.numel() for p in model.parameters()) * itemsize / 2**20

    def describe(self) -> str:
        return f"{self.family} h{self.hidden} L{self.layers} heads{self.heads} V{self.vocab} {self.dtype}"


MODELS: dict[str, ModelSpec] = {
    # CPU: a few layers, hidden 256-512, fp32
    "llama-cpu": ModelSpec(name="llama-cpu", family="llama", hidden=384, layers=2, heads=6,
                           kv_heads=2, vocab=4096, intermediate=1024),
    "gpt2-cpu": ModelSpec(name="gpt2-cpu", family="gpt2", hidden=256, layers=2, heads=4,
                          vocab=4096),
    # tiny: for the smoke test only
    "llama-tiny": ModelSpec(name="llama-tiny", family="llama", hidden=64, layers=1, heads=4,
                            vocab=64, intermediate=128),
    # weights-dominant (memory runs): ~125M parameters, 477 MiB in fp32, so N separate copies
    # outweigh every task's activations on short sequences
    "llama-large": ModelSpec(name="llama-large", family="llama", hidden=768, layers=12,
                             heads=12, kv_heads=4, vocab=32000, intermediate=2048),
    "llama-large-gpu": ModelSpec(name="llama-large-gpu", family="llama", hidden=768,
                                 layers=12, heads=12, kv_heads=4, vocab=32000,
                                 intermediate=2048, dtype="bfloat16"),
    # GPU: hidden >= 2048, bf16
    "llama-gpu": ModelSpec(name="llama-gpu", family="llama", hidden=2048, layers=8, heads=16,
                           vocab=32000, intermediate=5632, kv_heads=4, dtype="bfloat16"),
    "gpt2-gpu": ModelSpec(name="gpt2-gpu", family="gpt2", hidden=2048, layers=8, heads=16,
                          vocab=32000, dtype="bfloat16"),
}


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic fine-tuning task: its data and its adapter."""

    name: str
    data: SyntheticTask
    kind: str  # "lora" | "ia3"
    rank: int  # 0 for IA3
    targets: str  # "attn" | "all" | "mlp" (LoRA) ; IA3 uses the family's defaults

    def peft_config(self, family: str):
        """The PEFT config of this task's adapter for a ``family`` base."""
        from peft import IA3Config, LoraConfig

        gpt2 = family == "gpt2"
        if self.kind == "ia3":
            if gpt2:
                return IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                 feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
            return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"])
        targets = {
            ("attn", False): ["q_proj", "v_proj"],
            ("all", False): "all-linear",
            ("mlp", False): ["gate_proj", "up_proj", "down_proj"],
            ("attn", True): ["c_attn"],
            ("all", True): ["c_attn", "c_proj", "c_fc"],
            ("mlp", True): ["c_fc", "mlp.c_proj"],
        }[(self.targets, gpt2)]
        return LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=targets,
                          lora_dropout=0.0, fan_in_fan_out=gpt2)


# the non-uniform mix: lengths cycle with period 3, adapters with period 4
_PROFILES = ("sst2", "rte", "obqa")
_SHORT = {"sst2": (4, 16), "rte": (12, 64), "obqa": (8, 32)}  # ~1/4 of LENGTHS
WORKLOADS = ("uniform", "nonuniform", "nonuniform-short")
_ADAPTERS = (("lora", 4, "attn"), ("lora", 16, "all"), ("ia3", 0, "ia3"), ("lora", 8, "mlp"))


def workload_tasks(workload: str, n: int, family: str) -> list[TaskSpec]:
    """The first ``n`` tasks of ``workload`` (one of `WORKLOADS`) for a ``family`` base."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} is not one of {WORKLOADS}")
    lengths = _SHORT if workload == "nonuniform-short" else LENGTHS
    tasks = []
    for i in range(n):
        rule = Rule(mul=1 + (i // 7) % 2, add=1 + i % 7)
        if workload == "uniform":
            data = SyntheticTask(f"t{i:02d}-uniform", rule, LENGTHS["uniform"])
            tasks.append(TaskSpec(f"t{i:02d}-uniform-lora8", data, "lora", 8, "attn"))
            continue
        profile = _PROFILES[i % len(_PROFILES)]
        kind, rank, targets = _ADAPTERS[i % len(_ADAPTERS)]
        label = f"{kind}{rank}" if kind == "lora" else kind
        data = SyntheticTask(f"t{i:02d}-{profile}", rule, lengths[profile])
        tasks.append(TaskSpec(f"t{i:02d}-{profile}-{label}", data, kind, rank, targets))
    return tasks


def make_batches(tasks: list[TaskSpec], steps: int, rows: int, vocab: int, seed: int) -> list[Step]:
    """``steps`` steps of one padded batch per task; task ``i``'s data depends only on
    (``seed``, ``i``), so every system and every task count sees the same batches."""
    per_task = []
    for i, t in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        per_task.append([sample_batch(t.data, rows, vocab, gen) for _ in range(steps)])
    return [{t.name: per_task[i][s] for i, t in enumerate(tasks)} for s in range(steps)]


# ---------------------------------------------------------------------------------- systems


class System(Protocol):
    """A way to train N tasks: one `step` = one forward/backward/optimizer step per task."""

    options: str

    def step(self, batches: Step) -> None: ...

    def computed_tokens(self, batches: Step) -> int: ...


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class HFSeparate:
    """System 1: a PeftModel over its own base copy per task, trained one after another."""

    options = "peft.get_peft_model per task (own base copy), AdamW per task"

    def __init__(self, bases: list[torch.nn.Module], tasks: list[TaskSpec], family: str):
        from peft import get_peft_model

        self.models, self.optims = {}, {}
        for base, t in zip(bases, tasks):
            model = get_peft_model(base, t.peft_config(family)).train()
            self.models[t.name] = model
            self.optims[t.name] = _adamw([p for p in model.parameters() if p.requires_grad])
        self.device = next(iter(self.models.values())).device

    def step(self, batches: Step) -> None:
        for name, batch in batches.items():
            loss = self.models[name](**_to(batch, self.device), use_cache=False).loss
            loss.backward()
            self.optims[name].step()
            self.optims[name].zero_grad(set_to_none=True)

    def computed_tokens(self, batches: Step) -> int:
        return sum(b["input_ids"].numel() for b in batches.values())


class HFMultiAdapter(HFSeparate):
    """System 2: one PeftModel per adapter type, every task an adapter of it, `set_adapter`
    per task (PEFT cannot hold LoRA and IA3 adapters in one model)."""

    options = "one PeftModel per adapter type, add_adapter per task, set_adapter per step"

    def __init__(self, bases: list[torch.nn.Module], tasks: list[TaskSpec], family: str):
        from peft import get_peft_model

        groups: dict[str, list[TaskSpec]] = {}
        for t in tasks:
            groups.setdefault(t.kind, []).append(t)
        self.models, self.optims = {}, {}
        for base, members in zip(bases, groups.values()):
            first = members[0]
            model = get_peft_model(base, first.peft_config(family), adapter_name=first.name)
            for t in members[1:]:
                model.add_adapter(t.name, t.peft_config(family))
            model.train()
            named = list(model.named_parameters())
            for t in members:
                self.models[t.name] = model
                mine = [p for n, p in named if f".{t.name}." in n or n.endswith(f".{t.name}")]
                self.optims[t.name] = _adamw(mine)
        self.device = next(iter(self.models.values())).device

    @staticmethod
    def base_copies(tasks: list[TaskSpec]) -> int:
        """Base copies this system holds: one per adapter type."""
        return len({t.kind for t in tasks})

    def step(self, batches: Step) -> None:
        for name, batch in batches.items():
            model = self.models[name]
            model.base_model.set_adapter(name)
            loss = model(**_to(batch, self.device), use_cache=False).loss
            loss.backward()
            self.optims[name].step()
            self.optims[name].zero_grad(set_to_none=True)


def muxc_options(system: str, cost_model: str = ""):
    """The `muxc.Options` a muxc system runs with in THIS build, and a readable string.

    ``system`` is ``spatial``, ``temporal``, ``muxc`` or a fixed configuration
    ``<fusion>-chunk<size>`` (`fixed_systems`). ``alignment`` is passed only when the build's
    Options has that field (the planner adds it); the string says what actually ran.
    ``cost_model``: muxc full (``muxc``) plans with this on-device profile (`muxc.Options`
    ``cost_model``; "" keeps the roofline default); the fixed systems need no cost model.

    >>> muxc_options("temporal-chunk64")[1].split()[:3]
    ['fusion=temporal', 'alignment=chunk', 'chunk_size=64']
    """
    import muxc

    fusion, _, chunk = system.partition("-chunk")
    fusion = {"spatial": "spatial", "temporal": "temporal", "muxc": "auto"}[fusion]
    kwargs: dict[str, Any] = {"fusion": fusion}
    names = {f.name for f in dataclasses.fields(muxc.Options)}
    if chunk:
        kwargs.update(alignment="chunk", chunk_size=int(chunk))
    elif "alignment" in names and system != "temporal":
        kwargs["alignment"] = "chunk" if system == "muxc" else "pad"
    if cost_model and system == "muxc" and "cost_model" in names:
        kwargs["cost_model"] = cost_model
    options = muxc.Options(**kwargs)
    shown = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        shown.append(f"{f.name}={getattr(value, 'value', value)}")
    return options, " ".join(shown)


class Muxc:
    """Systems 3-5 and the fixed configurations: the N PeftModels compiled by muxc onto one
    shared backbone."""

    def __init__(self, bases: list[torch.nn.Module], tasks: list[TaskSpec], family: str,
                 system: str, cost_model: str = ""):
        import muxc
        from peft import get_peft_model

        options, self.options = muxc_options(system, cost_model)
        specs = [muxc.Task(name=t.name, model=get_peft_model(b, t.peft_config(family)), lr=1e-3)
                 for b, t in zip(bases, tasks)]
        c0, t0 = time.process_time(), time.perf_counter()
        self.program = muxc.compile(specs, options)
        self.compile_s = time.perf_counter() - t0
        self.compile_cpu_s = time.process_time() - c0
        if getattr(options, "cost_model", None):
            # load the profile (or profile what it lacks) now, during setup: not in the
            # compile time, the timed steps or the training memory peak
            self.program.planner.fusion  # noqa: B018

    def step(self, batches: Step) -> None:
        self.program.step(batches)

    def computed_tokens(self, batches: Step) -> int:
        padding = self.program.explain(batches).padding
        return int(padding["tokens computed"])

    def plan(self, batches: Step) -> str:
        """What the executor runs for ``batches``: hTask sizes and chunk size (the StepPlan)."""
        plan = self.program.plan(batches)
        text = "hTasks " + "+".join(str(len(h)) for h in plan.htasks)
        own = getattr(plan, "chunk_sizes", (plan.chunk_size,))
        if len(set(own)) > 1:  # hTasks run their own chunk sizes
            text += ", chunks " + "/".join(str(c) for c in own)
        elif plan.chunk_size is not None:
            text += f", chunk {own[0]}"
        return text


def build_system(system: str, model: ModelSpec, tasks: list[TaskSpec], device: torch.device,
                 seed: int, cost_model: str = "") -> System:
    """Build ``system`` over the base copies it needs (the template is one of them);
    ``cost_model``: see `muxc_options`."""
    copies = HFMultiAdapter.base_copies(tasks) if system == "hf-multi-adapter" else len(tasks)
    bases = [model.build(device, seed)]
    bases += [copy.deepcopy(bases[0]) for _ in range(copies - 1)]
    if system == "hf-separate":
        return HFSeparate(bases, tasks, model.family)
    if system == "hf-multi-adapter":
        return HFMultiAdapter(bases, tasks, model.family)
    return Muxc(bases, tasks, model.family, system, cost_model)


# ------------------------------------------------------------------------------ measurement


class Memory:
    """Peak memory of this process since the last `reset`, minus an idle baseline (MiB).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: peak RSS (``VmHWM``), whose high-water
    mark is reset by writing 5 to ``/proc/self/clear_refs``; freed heap pages are handed back
    (``malloc_trim``) before each reset so they are not counted as live.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self._current()

    def _current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _status_mib("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline
        return _status_mib("VmHWM") - self.baseline

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def strict_malloc() -> bool:
    """Make this process's RSS follow its live memory: what ``MALLOC_MMAP_THRESHOLD_=65536
    MALLOC_TRIM_THRESHOLD_=0`` does at start-up, applied with ``mallopt`` (a forked worker
    cannot re-read its environment). Every block of 64 KiB or more is then its own mapping,
    returned to the system when freed, and the heap top is trimmed at once, so freed base
    copies and activations stop counting (glibc otherwise keeps them: peaks varied by 20%).
    Returns False where the C library has no ``mallopt`` (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 65536)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 0))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Case:
    """One measurement: a system training ``tasks`` tasks of a workload on a model."""

    model: str
    workload: str
    tasks: int
    system: str
    device: str = "cpu"
    rows: int = 4
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    threads: int = 0  # CPU intra-op threads (0: torch's default)
    profile: bool = False  # also profile one extra step (not timed)
    part: str = "main"  # which part of the benchmark: main | sweep | memory | compile
    strict_malloc: bool = False  # CPU: `strict_malloc()` before anything is built
    cost_model: str = ""  # muxc full's on-device profile (`muxc_options`); "": roofline
    # memory peak of the timed steps only (reset after the warm-up, which runs the first timed
    # step's batches): steady state, every system's optimizer state already allocated
    steady_peak: bool = False

    def key(self) -> tuple:
        return (self.model, self.workload, self.tasks, self.system)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CaseRun:
    """One case in THIS process, in three phases so that several processes can take turns:
    `__init__` builds the system (and resets the memory peak), `step(i)` runs and times
    step ``i`` (warm-up steps first), `finish()` returns the result row.

    Meant for a fresh process: the memory numbers are this process's peaks.
    """

    def __init__(self, case: Case):
        self.case = case
        self.device = torch.device(case.device)
        if self.device.type == "cpu" and case.threads:
            torch.set_num_threads(case.threads)
        self.strict_malloc = (self.device.type == "cpu" and case.strict_malloc
                              and strict_malloc())
        self.spec = MODELS[case.model]
        tasks = workload_tasks(case.workload, case.tasks, self.spec.family)
        if case.steady_peak:  # the warm-up repeats the first timed step's batches
            timed = make_batches(tasks, case.steps, case.rows, self.spec.vocab, case.seed)
            self.batches = timed[:1] * case.warmup + timed
        else:
            self.batches = make_batches(tasks, case.warmup + case.steps, case.rows,
                                        self.spec.vocab, case.seed)
        self.memory = Memory(self.device)
        t0 = time.perf_counter()
        self.system = build_system(case.system, self.spec, tasks, self.device, case.seed,
                                   case.cost_model)
        self.setup_s = time.perf_counter() - t0
        self.setup_mib = self.memory.peak()
        self.memory.reset()
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    @property
    def clock(self) -> str:
        """``cpu``: process CPU time, for single-threaded CPU runs (on a shared machine wall
        time also counts the neighbours' jobs); ``wall``: perf_counter (CUDA synchronised)."""
        return "cpu" if self.device.type == "cpu" and self.case.threads == 1 else "wall"

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def step(self, i: int) -> float:
        """Run step ``i`` (in order); returns its seconds."""
        if i != len(self.times):
            raise ValueError(f"steps run in order: expected step {len(self.times)}, got {i}")
        _sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        self.system.step(self.batches[i])
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        if self.case.steady_peak and i + 1 == self.case.warmup:
            self.memory.reset()  # the peak of the timed steps: optimizer state included
        return self.times[-1]

    def finish(self) -> dict[str, Any]:
        """The result row (after every step ran); profiles one extra step if asked."""
        case = self.case
        if len(self.times) != self.total_steps:
            raise ValueError(f"finish() after {len(self.times)} of {self.total_steps} steps")
        peak_mib = self.memory.peak()
        timed = self.batches[case.warmup:]
        wall, cpu = self.times[case.warmup:], self.cpu_times[case.warmup:]
        times = cpu if self.clock == "cpu" else wall
        effective = [_real_tokens(b) for b in timed]
        computed = [self.system.computed_tokens(b) for b in timed]
        row = {
            **dataclasses.asdict(case),
            "model_desc": self.spec.describe(),
            "options": self.system.options,
            "clock": self.clock,
            "step_ms": statistics.median(times) * 1e3,
            "effective_tok_s": statistics.median(e / t for e, t in zip(effective, times)),
            "raw_tok_s": statistics.median(c / t for c, t in zip(computed, times)),
            "wall_step_ms": statistics.median(wall) * 1e3,
            "cpu_step_ms": statistics.median(cpu) * 1e3,
            "wall_effective_tok_s": statistics.median(e / t for e, t in zip(effective, wall)),
            "effective_tokens_per_step": statistics.mean(effective),
            "computed_tokens_per_step": statistics.mean(computed),
            "ineffective_fraction": 1 - sum(effective) / sum(computed),
            "plan": self.system.plan(timed[-1]) if hasattr(self.system, "plan") else "",
            "peak_mem_mib": peak_mib,
            "setup_peak_mib": self.setup_mib,
            "setup_s": self.setup_s,
            "compile_s": getattr(self.system, "compile_s", 0.0),
            "compile_cpu_s": getattr(self.system, "compile_cpu_s", 0.0),
            "strict_malloc": self.strict_malloc,
            "step_ms_all": " ".join(f"{t * 1e3:.0f}" for t in self.times),
            "cpu_ms_all": " ".join(f"{t * 1e3:.0f}" for t in self.cpu_times),
        }
        if case.profile:
            row["profile_ms"] = profile_step(self.system, self.batches[-1], self.device)
        return row


def run_case(case: Case) -> dict[str, Any]:
    """Build, warm up, time and report one case in this process (no turn-taking)."""
    run = CaseRun(case)
    for i in range(run.total_steps):
        run.step(i)
    return run.finish()


def _real_tokens(batches: Mapping[str, Batch]) -> int:
    """Tokens that carry data (and loss) in one step, the same for every system."""
    return sum(int(b["attention_mask"].sum()) for b in batches.values())


# -------------------------------------------------------------------------------- profiling

_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_CATEGORIES = (  # first match wins
    ("GEMM", _GEMMS),
    ("adapter ops (muxc)", ("muxc::", "multi_lora", "multi_ia3")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("optimizer.", "_foreach", "adamw", "lerp", "addcdiv", "addcmul")),
    ("copies, gather, scatter, cat", ("copy_", "fill_", "zero_", "aten::cat", "pad", "index",
                                      "scatter", "gather", "clone", "contiguous", "_to_copy")),
    ("elementwise, norms", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "gelu",
                            "tanh", "pow", "rsqrt", "mean", "aten::neg", "aten::exp", "where",
                            "masked_fill", "aten::cos", "aten::sin", "aten::sum")),
)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for a block."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profile_step(system: System, batches: Step, device: torch.device) -> dict[str, float]:
    """Milliseconds of one profiled step split by operator kind (operator self time, as the
    profiler clocks it: wall time on CPU, device time on CUDA); ``python/framework`` is the
    step's wall time minus all operator time (CPU only) and ``step`` the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with _quiet_stderr(), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        system.step(batches)
        _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    totals = {name: 0.0 for name, _ in _CATEGORIES}
    totals["other ops"] = 0.0
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    gemm_calls = 0
    for ev in prof.key_averages():
        ms = getattr(ev, attr, 0.0) / 1e3
        name = ev.key.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k.lower() in name for k in keys)),
                   "other ops")
        totals[cat] += ms
        gemm_calls += ev.count if ev.key in _GEMMS else 0
    ops = sum(totals.values())
    totals["python/framework"] = max(0.0, wall - ops) if device.type == "cpu" else 0.0
    totals["step"] = wall
    return {"GEMM calls": gemm_calls, **{k: round(v, 1) for k, v in totals.items()}}
