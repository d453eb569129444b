"""Soak: a long multi-tenant training on a tiny Llama, tenants joining and leaving, one of them
sending bad input — does anything leak, slow down, or reach another tenant?

``python -m bench.soak`` (or ``muxc bench soak``): 2,000 steps of ``fusion="auto"``,
``alignment="chunk"`` with ``max_task_tokens`` set. Tenants:

- ``steady`` (LoRA) trains the whole run;
- ``mallory`` (IA3) trains the whole run and every ``--bad-every`` steps sends a bad batch
  instead (one of `BAD_KINDS` in turn); the step is refused with a typed error (or, for a
  batch without label tokens, ``mallory`` is left out with a warning), counted, and run again
  without ``mallory``'s batch, as an operator would;
- every ``--rotate-every`` steps the oldest rotating tenant leaves (`Program.remove_task`) and
  a new one joins (`Program.add_task`), so two rotating tenants (LoRA of two shapes) are live.

Measured: RSS (after ``malloc_trim(0)``, so glibc's kept free pages do not hide or fake a leak),
open file descriptors, threads, per-step wall and process CPU time (one torch thread), the
refused inputs by kind. Checked at the end: RSS within ``--rss-tol`` of RSS after
``--warmup`` steps; every refused kind refused with its expected error and nothing accepted
that should not be; every tenant's adapter equal to an isolated HF PEFT replay of exactly the
steps it trained in (same batches, same AdamW), within ``tol`` of how far training moved it
or within twice HF's own round-off divergence (the same replay with rows reversed).

Writes ``soak-<device>[-quick].csv`` (one row per sample), ``.md`` (summary) and
``-rss.png`` under ``--out``; exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import harness

__all__ = ["BAD_KINDS", "SoakConfig", "SoakResult", "run_soak", "main"]

VOCAB = 64
ROWS = 4
LENGTHS = (8, 32)
MAX_TASK_TOKENS = ROWS * LENGTHS[1]


def _set(key: str, value: int) -> Callable[[dict], None]:
    def corrupt(batches: dict) -> None:
        batches["mallory"][key][0, 1] = value
    return corrupt


def _cast(key: str, dtype: torch.dtype) -> Callable[[dict], None]:
    def corrupt(batches: dict) -> None:
        batches["mallory"][key] = batches["mallory"][key].to(dtype)
    return corrupt


def _oversized(batches: dict) -> None:
    b = batches["mallory"]
    batches["mallory"] = {k: v.repeat(5, 1) for k, v in b.items()}  # 20 rows of >= 8 tokens


def _unknown_task(batches: dict) -> None:
    batches["mallory2"] = batches.pop("mallory")


def _no_labels(batches: dict) -> None:
    batches["mallory"]["labels"] = torch.full_like(batches["mallory"]["labels"], -100)


def _nan_mask(batches: dict) -> None:
    m = batches["mallory"]["attention_mask"].float()
    m[0, 0] = float("nan")
    batches["mallory"]["attention_mask"] = m


# kind -> (corrupt the step's batches in place, what muxc must answer)
BAD_KINDS: dict[str, tuple[Callable[[dict], None], str]] = {
    "id >= vocab": (_set("input_ids", VOCAB), "BatchError"),
    "float labels": (_cast("labels", torch.float32), "BatchError"),
    "bool input_ids": (_cast("input_ids", torch.bool), "BatchError"),
    "label -7": (_set("labels", -7), "BatchError"),
    "mask NaN": (_nan_mask, "BatchError"),
    "over max_task_tokens": (_oversized, "AdmissionError"),
    "unknown task": (_unknown_task, "BatchError"),
    "no label tokens": (_no_labels, "EmptyBatchWarning"),
}


@dataclass(frozen=True)
class SoakConfig:
    steps: int = 2000
    rotate_every: int = 100
    bad_every: int = 50
    warmup: int = 200
    sample_every: int = 10
    rss_tol: float = 0.05
    tol: float = 1e-3  # max |muxc - replay| over max |trained - initial|, per tenant
    seed: int = 0
    # PEFT kinds of steady, mallory and the two alternating rotating tenants (`_peft_config`);
    # each distinct one is traced again at every join/leave, so --quick uses fewer
    kinds: tuple[str, str, str, str] = ("lora-all", "ia3", "lora-qv", "lora-mlp")

    @property
    def window(self) -> int:
        """Steps per step-time drift window."""
        return max(1, min(self.rotate_every, (self.steps - self.warmup) // 2))


@dataclass
class Tenant:
    name: str
    kind: str  # which PEFT config (see `_peft_config`)
    seed: int
    lr: float
    joined: int
    left: int | None = None
    trained: list[int] = field(default_factory=list)  # steps it took an optimizer step in
    model: object = None  # its PeftModel while live
    final: dict[str, torch.Tensor] | None = None  # its adapter when it left / at the end


@dataclass
class SoakResult:
    config: SoakConfig
    samples: list[dict]
    events: list[tuple[int, str]]  # (step, "join x" / "leave y")
    refused: Counter  # bad kind -> times answered as expected
    wrong: list[str]  # bad kinds answered otherwise (should be empty)
    answers: dict[str, str]  # bad kind -> what muxc answered (error/warning class)
    step_wall_ms: list[float]
    step_cpu_ms: list[float]
    lifecycle_s: list[float]
    replay: list[dict]  # per tenant: steps trained, max abs diff vs isolated replay
    wall_s: float

    def rss_after_warmup(self) -> float:
        return next(s["rss_mib"] for s in self.samples if s["step"] >= self.config.warmup)

    def rss_end(self) -> float:
        return self.samples[-1]["rss_mib"]

    def rss_change(self) -> float:
        return self.rss_end() / self.rss_after_warmup() - 1

    def drift(self) -> tuple[float, float, float]:
        """(median CPU ms per step in the first window after warm-up, in the last window,
        their ratio); windows of ``rotate_every`` steps."""
        w, start = self.config.window, self.config.warmup
        first = statistics.median(self.step_cpu_ms[start:start + w])
        last = statistics.median(self.step_cpu_ms[-w:])
        return first, last, last / first

    def checks(self) -> dict[str, bool]:
        return {
            f"RSS at the end within {self.config.rss_tol:.0%} of RSS after warm-up":
                abs(self.rss_change()) <= self.config.rss_tol,
            "every bad input refused as expected": not self.wrong and sum(self.refused.values()) > 0,
            f"every tenant's adapter equals its isolated HF PEFT replay (max abs diff <= "
            f"{self.config.tol:g} x how far training moved it, or <= 2 x HF's own round-off "
            "divergence)": all(r["max_abs_diff"] <= max(self.config.tol * r["max_abs_change"],
                                                         2 * r["hf_noise"]) for r in self.replay),
            "open file descriptors at the end <= after warm-up":
                self.samples[-1]["fds"] <= next(s["fds"] for s in self.samples
                                                if s["step"] >= self.config.warmup),
        }


def _peft_config(kind: str):
    from peft import IA3Config, LoraConfig

    if kind == "lora-qv":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    if kind == "lora-mlp":
        return LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                          lora_dropout=0.0)
    if kind == "lora-all":
        return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    if kind == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])
    raise ValueError(kind)


def _new_model(base, tenant: Tenant):
    from peft import get_peft_model

    torch.manual_seed(tenant.seed)  # the adapter's init: the replay builds the same one
    model = get_peft_model(copy.deepcopy(base), _peft_config(tenant.kind))
    g = torch.Generator().manual_seed(tenant.seed)
    with torch.no_grad():  # LoRA B starts at 0: perturb it so every tensor has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(tenant: Tenant, step: int) -> dict[str, torch.Tensor]:
    """Tenant's batch for ``step``: a pure function of (tenant, step), so the replay needs no
    stored data (stored batches would grow RSS and look like a leak)."""
    from muxc.workloads import Rule, SyntheticTask, sample_batch

    synth = SyntheticTask(tenant.name, Rule(1 + tenant.seed % 2, 1 + tenant.seed % 5), LENGTHS)
    return sample_batch(synth, ROWS, VOCAB, torch.Generator().manual_seed(tenant.seed * 100_003 + step))


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


_LIBC = None


def _rss_mib(proc) -> float:
    """RSS after giving glibc's free heap pages back (``malloc_trim(0)``, where available)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    return proc.memory_info().rss / (1 << 20)


def run_soak(config: SoakConfig, on_sample: Callable[[dict], None] | None = None) -> SoakResult:
    """Run the soak (see module doc) and return everything it measured."""
    import psutil
    from transformers import LlamaForCausalLM

    import muxc
    from muxc.workloads import tiny_llama_config

    proc = psutil.Process()
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    base = LlamaForCausalLM(tiny_llama_config(hidden=32, layers=2, vocab=VOCAB)).eval()
    for p in base.parameters():
        p.requires_grad_(False)

    serial = iter(range(1, 1_000_000))
    steady_kind, mallory_kind, *rotating_kinds = config.kinds

    def tenant(name: str, kind: str, step: int) -> Tenant:
        t = Tenant(name, kind, seed=config.seed * 1000 + next(serial), lr=1e-2, joined=step)
        t.model = _new_model(base, t)
        return t

    live = [tenant("steady", steady_kind, 0), tenant("mallory", mallory_kind, 0),
            tenant("r0", rotating_kinds[0], 0), tenant("r1", rotating_kinds[1], 0)]
    everyone = list(live)
    options = muxc.Options(fusion="auto", alignment="chunk", max_task_tokens=MAX_TASK_TOKENS)
    program = muxc.compile([muxc.Task(name=t.name, model=t.model, lr=t.lr) for t in live], options)

    samples: list[dict] = []
    events: list[tuple[int, str]] = []
    refused: Counter = Counter()
    wrong: list[str] = []
    answers: dict[str, str] = {}
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    lifecycle_s: list[float] = []
    kinds = list(BAD_KINDS)
    n_bad = n_rot = 0

    for step in range(config.steps):
        if step and step % config.rotate_every == 0:
            t0 = time.perf_counter()
            old = next(t for t in live if t.name.startswith("r"))
            program.remove_task(old.name)
            old.final, old.model, old.left = _adapter(old.model), None, step
            live.remove(old)
            n_rot += 1
            new = tenant(f"r{n_rot + 1}", rotating_kinds[(n_rot + 1) % 2], step)
            program.add_task(muxc.Task(name=new.name, model=new.model, lr=new.lr))
            live.append(new)
            everyone.append(new)
            events += [(step, f"leave {old.name}"), (step, f"join {new.name}")]
            lifecycle_s.append(time.perf_counter() - t0)
        batches = {t.name: _batch(t, step) for t in live}
        bad = None
        if step % config.bad_every == config.bad_every - 1:
            bad = kinds[n_bad % len(kinds)]
            n_bad += 1
            BAD_KINDS[bad][0](batches)
        w0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                program.step(batches)
                answer = next((type(w.message).__name__ for w in caught
                               if isinstance(w.message, muxc.MuxcWarning)), "accepted")
            except muxc.MuxcError as exc:
                answer = type(exc).__name__
                if bad is None:
                    raise  # a good step refused: a bug, stop here
                batches.pop("mallory", None)
                batches.pop("mallory2", None)
                w0, c0 = time.perf_counter(), time.process_time()
                program.step(batches)  # the operator drops the bad batch and goes on
        wall_ms.append((time.perf_counter() - w0) * 1e3)
        cpu_ms.append((time.process_time() - c0) * 1e3)
        if bad is not None:
            answers[bad] = answer
            if answer == BAD_KINDS[bad][1]:
                refused[bad] += 1
            else:
                wrong.append(f"step {step}: {bad} -> {answer}")
        elif answer != "accepted":
            wrong.append(f"step {step}: good batches -> {answer}")
        for t in live:
            out = program.last_step.get(t.name)
            if out is not None and not out.skipped:
                t.trained.append(step)
        if (step + 1) % config.sample_every == 0:
            row = {
                "step": step + 1,
                "rss_mib": round(_rss_mib(proc), 2),
                "fds": proc.num_fds(),
                "open_files": len(proc.open_files()),
                "threads": proc.num_threads(),
                "step_wall_ms": round(statistics.median(wall_ms[-config.sample_every:]), 3),
                "step_cpu_ms": round(statistics.median(cpu_ms[-config.sample_every:]), 3),
                "tasks": len(live),
                "refused": sum(refused.values()),
            }
            samples.append(row)
            if on_sample is not None:
                on_sample(row)
    for t in live:
        t.final, t.model = _adapter(t.model), None
    del program
    replay = [_replay(base, t) for t in everyone]
    return SoakResult(config, samples, events, refused, wrong, answers, wall_ms, cpu_ms,
                      lifecycle_s, replay, time.perf_counter() - t_start)


def _replay(base, t: Tenant) -> dict:
    """Train ``t`` alone in HF PEFT on exactly the steps it trained in; compare adapters.

    Also trains it alone a second time with each batch's rows reversed (the same math in
    another fp32 summation order): over many AdamW steps such round-off grows chaotically, and
    that HF-vs-HF difference (``hf_noise``) is the floor any other implementation is held to."""
    runs = []
    for flip in (False, True):
        model = _new_model(base, t)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)
        for step in t.trained:
            b = _batch(t, step)
            model(**({k: v.flip(0) for k, v in b.items()} if flip else b)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(_adapter(model))
    want, flipped = runs
    assert want.keys() == t.final.keys(), t.name
    diff = max((want[n] - t.final[n]).abs().max().item() for n in want)
    noise = max((want[n] - flipped[n]).abs().max().item() for n in want)
    moved = max((want[n] - v).abs().max().item() for n, v in _adapter(_new_model(base, t)).items())
    return {"tenant": t.name, "peft": t.kind, "joined": t.joined, "left": t.left,
            "steps_trained": len(t.trained), "max_abs_diff": diff, "hf_noise": noise,
            "max_abs_change": moved}


def report(result: SoakResult, device: torch.device, quick: bool) -> str:
    """The markdown summary."""
    c = result.config
    first, last, ratio = result.drift()
    checks = result.checks()
    fds = [s["fds"] for s in result.samples]
    lines = [
        f"# Soak ({'quick' if quick else 'full'}): {c.steps} steps, tenants joining and leaving",
        "",
        f"`python -m bench.soak{' --quick' if quick else ''}` on {harness.device_name(device)} "
        f"(1 torch thread), {result.wall_s:.0f} s wall. Tiny Llama (hidden 32, 2 layers, vocab "
        f"{VOCAB}), `fusion=\"auto\"`, `alignment=\"chunk\"`, `max_task_tokens={MAX_TASK_TOKENS}`, "
        f"{ROWS} rows of {LENGTHS[0]}-{LENGTHS[1]} tokens per tenant per step. Tenants: `steady` "
        f"({c.kinds[0]}) and `mallory` ({c.kinds[1]}) all along; a rotating tenant ({c.kinds[2]} "
        f"or {c.kinds[3]}) leaves and a new one joins every {c.rotate_every} steps; `mallory` sends a bad "
        f"batch every {c.bad_every} steps.",
        "",
        "Measured on a shared machine: other agents ran on the same 2 CPU cores during this run, "
        "so wall-clock step and join/leave times are noisy and inflated; the drift below uses "
        "process CPU time per step (still affected by cache and core sharing). PEFT kinds: "
        "lora-all = LoRA r8 on every linear, lora-qv = LoRA r4 on q/v, lora-mlp = LoRA r2 on "
        "gate/up/down, ia3 = IA3 on k/v/down.",
        "",
        "## Checks",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks.items()],
        "",
        "## Numbers",
        "",
        f"- RSS after warm-up ({c.warmup} steps): {result.rss_after_warmup():.1f} MiB; at the end: "
        f"{result.rss_end():.1f} MiB ({result.rss_change():+.2%}); max after warm-up "
        f"{max(s['rss_mib'] for s in result.samples if s['step'] >= c.warmup):.1f} MiB "
        "(RSS read after `malloc_trim(0)`).",
        f"- Open file descriptors: {fds[0]} at the first sample, {min(fds)}-{max(fds)} over the "
        f"run, {fds[-1]} at the end; threads {result.samples[-1]['threads']}.",
        f"- Step CPU time (median of {c.window} steps): {first:.1f} ms in the first window "
        f"after warm-up, {last:.1f} ms in the last ({ratio:.2f}x). Wall: median "
        f"{statistics.median(result.step_wall_ms):.1f} ms per step.",
        f"- Join + leave (remove_task, add_task: re-plan, trace the new task): median "
        f"{statistics.median(result.lifecycle_s) if result.lifecycle_s else 0:.2f} s, "
        f"{len(result.lifecycle_s)} times.",
        f"- Bad inputs: {sum(result.refused.values())} answered as expected, "
        f"{len(result.wrong)} not{': ' + '; '.join(result.wrong[:5]) if result.wrong else ''}.",
        "",
        "| bad input (from `mallory`) | times | muxc's answer | expected |",
        "|---|---|---|---|",
        *[f"| {k} | {result.refused[k]} | {result.answers.get(k, 'not tried')} | {v[1]} |"
          for k, v in BAD_KINDS.items()],
        "",
        "A refused step changes nothing; the soak then runs the step again without `mallory`'s "
        "batch. `EmptyBatchWarning` is not a refusal: muxc leaves `mallory` out of that step and "
        "trains the others.",
        "",
        "## Every tenant vs the same steps alone in HF PEFT",
        "",
        "Each tenant's adapter after it left (or at the end) against a fresh copy trained alone "
        "with `model(**batch).loss.backward()` and the same AdamW on exactly the steps it trained "
        "in (`max_abs_change`: how far training moved it; `hf_noise`: the same HF replay against "
        "itself with each batch's rows reversed, i.e. pure fp32 round-off grown over the steps).",
        "",
        harness.markdown_table(result.replay, ["tenant", "peft", "joined", "left", "steps_trained",
                                               "max_abs_diff", "hf_noise", "max_abs_change"]),
        "",
        f"![RSS over the run]({_stem(device, quick)}-rss.png)",
    ]
    return "\n".join(lines) + "\n"


def _stem(device: torch.device, quick: bool) -> str:
    return f"soak-{harness.device_slug(device)}{'-quick' if quick else ''}"


def plot(result: SoakResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [s["step"] for s in result.samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, [s["rss_mib"] for s in result.samples], color="tab:blue", label="RSS (MiB)")
    warm = result.rss_after_warmup()
    tol = result.config.rss_tol
    ax.axhspan(warm * (1 - tol), warm * (1 + tol), color="tab:blue", alpha=0.1,
               label=f"±{tol:.0%} of RSS after warm-up")
    ax.axvline(result.config.warmup, color="gray", linestyle=":", label="end of warm-up")
    for step, what in result.events:
        if what.startswith("join"):
            ax.axvline(step, color="tab:green", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("step (green: a tenant leaves and one joins)")
    ax.set_ylabel("RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot(steps, [s["step_cpu_ms"] for s in result.samples], color="tab:orange", alpha=0.6,
             label="step CPU ms (median of samples)")
    ax2.set_ylabel("step CPU time (ms)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.set_title("muxc soak: RSS and step time while tenants come and go")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized: 200 steps, one join/leave at 100, warm-up 150, a bad batch "
                         "every 25 steps (each kind once), LoRA q/v tenants and IA3 mallory")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rotate-every", type=int, default=None, help="default 100")
    ap.add_argument("--bad-every", type=int, default=None, help="default 50 (--quick: 25)")
    ap.add_argument("--out", type=Path, default=harness.RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quick = dict(steps=200, warmup=150, bad_every=25,
                 kinds=("lora-qv", "ia3", "lora-qv", "lora-qv")) if args.quick else {}
    given = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup),
                               ("rotate_every", args.rotate_every), ("bad_every", args.bad_every))
             if v is not None}
    config = SoakConfig(**{**quick, **given})
    if config.warmup + 2 > config.steps:
        ap.error("--steps must leave steps after --warmup")
    device = torch.device("cpu")

    def progress(row: dict) -> None:
        if row["step"] % 100 == 0:
            print(f"step {row['step']:5d}  rss {row['rss_mib']:7.1f} MiB  fds {row['fds']:3d}  "
                  f"step {row['step_cpu_ms']:6.1f} ms cpu  refused {row['refused']}", flush=True)

    result = run_soak(config, on_sample=progress)
    stem = _stem(device, args.quick)
    meta = harness.machine(device)
    harness.write_csv([{**meta, **s} for s in result.samples], args.out / f"{stem}.csv")
    (args.out / f"{stem}.md").write_text(report(result, device, args.quick))
    png = plot(result, args.out / f"{stem}-rss.png")
    checks = result.checks()
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"wrote {args.out / stem}.csv, .md{', -rss.png' if png else ''}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
