"""``python -m bench.kernels`` (or ``muxc bench kernels``): the multi-adapter kernels against
what other systems do, side by side.

For every point of a sweep (tasks x tokens per task x hidden size x uniform/mixed ranks) it
times, in the same process and on the same inputs:

- ``muxc-triton``        the Triton kernels, steady state (segment metadata already cached);
- ``muxc-triton+meta``   the same, rebuilding all metadata every call (fresh `Segments`, row
                         tiles and segment tables, host-to-device copies included);
- ``torch-loop``         one small GEMM pair per task, as HF PEFT runs separate adapters;
- ``padded-bmm``         ranks zero-padded to the maximum and one batched GEMM pair, as
                         serving systems (Punica/S-LoRA-style BGMV) stack adapters (LoRA only).

Passes: forward, and forward+backward through autograd (adapter and input gradients). Rates
use the *useful* work of the op, the same for every implementation: bytes = activations and
adapters read and written once (fwd: x, y, A, B; fwd+bwd adds dy, x again, dx, A, B, dA, dB),
FLOPs = 2 * sum_i tokens_i * r_i * (K + N) forward, 3x that forward+backward. The roofline
fraction is ``max(bytes / peak bandwidth, FLOPs / peak FLOP/s) / measured time``.

Writes ``bench/results/kernels-<device>.csv`` (tidy, one row per measurement), ``.md`` (the
tables) and ``.png`` (time vs tasks). On CPU the Triton columns run the Triton *interpreter*
(numpy, one program instance at a time): they show the kernels are correct and take one
launch per kind, not their speed; GPU numbers come from a CUDA run.

>>> len(sweep(quick=True, device=torch.device("cpu")))  # 6 task counts x (2 LoRA + 1 IA3)
18
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import muxc
from bench import harness
from bench.harness import resolve_device
from muxc.kernels import _triton, multi_ia3, multi_lora
from muxc.kernels.lora import segments_for

__all__ = ["main", "sweep", "Point", "run"]

TASKS = (1, 2, 4, 8, 16, 32)
MIXED = (4, 8, 16, 64)
"""Mixed ranks cycle through these: the padded baseline pads them all to 64."""


@dataclass(frozen=True)
class Point:
    """One sweep point; ``ranks`` is per task (IA3 ignores it)."""

    op: str
    tasks: int
    tokens: int
    hidden: int
    rank_mix: str
    ranks: tuple[int, ...]


def sweep(quick: bool, device: torch.device) -> list[Point]:
    """The points to measure. Full: tokens/task {128, 512, 2048}, hidden {1024, 4096} on GPU
    ({64, 256} tokens, hidden {512} on CPU). Quick: 32 tokens/task, hidden 256."""
    if quick:
        tokens, hidden = (32,), (256,)
    elif device.type == "cuda":
        tokens, hidden = (128, 512, 2048), (1024, 4096)
    else:
        tokens, hidden = (64, 256), (512,)
    points = []
    for n in TASKS:
        for t in tokens:
            for h in hidden:
                points.append(Point("lora", n, t, h, "uniform-16", (16,) * n))
                points.append(Point("lora", n, t, h, "mixed-4..64",
                                    tuple(MIXED[i % len(MIXED)] for i in range(n))))
                if h == hidden[-1] and t == tokens[-1]:
                    points.append(Point("ia3", n, t, h, "-", (0,) * n))
    return points


# ----------------------------------------------------------------------------- implementations


def _lora_inputs(p: Point, dtype, device):
    g = torch.Generator().manual_seed(p.tasks * 1000 + p.tokens)
    k = n = p.hidden
    x = torch.randn(p.tokens * p.tasks, k, generator=g).to(dtype).to(device)
    a = [(torch.randn(r, k, generator=g) / k**0.5).to(dtype).to(device) for r in p.ranks]
    b = [(torch.randn(n, r, generator=g) / 4).to(dtype).to(device) for r in p.ranks]
    scaling = [2.0] * p.tasks
    return [p.tokens] * p.tasks, x, a, b, scaling


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def _lora_impls(p: Point, dtype, device) -> dict[str, Callable[[bool], Callable[[], object]]]:
    """name -> make(backward) -> a zero-argument callable running one pass."""
    lens, x0, a0, b0, scaling = _lora_inputs(p, dtype, device)
    dy = torch.randn(x0.shape[0], p.hidden, dtype=dtype, device=device)
    r_max = max(p.ranks)

    def muxc(meta: bool):
        def make(backward: bool):
            x, a, b = _leaf(x0, backward), [_leaf(t, backward) for t in a0], [
                _leaf(t, backward) for t in b0]

            def run():
                if meta:  # a new step: nothing cached (Segments, row tiles, tables)
                    segments_for.cache_clear()
                    _triton.clear_tables()
                y = multi_lora(x, lens, a, b, scaling, impl="triton")
                if backward:
                    x.grad = None
                    y.backward(dy)
                return y

            return run

        return make

    def loop(backward: bool):
        x, a, b = _leaf(x0, backward), [_leaf(t, backward) for t in a0], [
            _leaf(t, backward) for t in b0]

        def run():
            outs, s = [], 0
            for i, n in enumerate(lens):  # what separate PEFT adapters do: a GEMM pair each
                outs.append((x[s:s + n] @ a[i].t()) @ b[i].t() * scaling[i])
                s += n
            y = torch.cat(outs)
            if backward:
                x.grad = None
                y.backward(dy)
            return y

        return run

    def padded(backward: bool):
        # Adapters stacked once into zero-padded (tasks, r_max, K) / (tasks, N, r_max) leaves,
        # as a serving system keeps them; the padding is computed and its gradient discarded.
        ap = torch.zeros(p.tasks, r_max, p.hidden, dtype=dtype, device=device)
        bp = torch.zeros(p.tasks, p.hidden, r_max, dtype=dtype, device=device)
        for i, (a, b) in enumerate(zip(a0, b0)):
            ap[i, : a.shape[0]] = a
            bp[i, :, : b.shape[1]] = b
        x, ap, bp = _leaf(x0, backward), _leaf(ap, backward), _leaf(bp, backward)
        s = torch.tensor(scaling, dtype=dtype, device=device).view(-1, 1, 1)

        def run():
            xs = x.view(p.tasks, p.tokens, p.hidden)  # equal tokens per task: no token padding
            y = (torch.bmm(torch.bmm(xs, ap.transpose(1, 2)), bp.transpose(1, 2)) * s)
            y = y.view(-1, p.hidden)
            if backward:
                x.grad = None
                y.backward(dy)
            return y

        return run

    return {"muxc-triton": muxc(False), "muxc-triton+meta": muxc(True), "torch-loop": loop,
            "padded-bmm": padded}


def _ia3_impls(p: Point, dtype, device) -> dict[str, Callable[[bool], Callable[[], object]]]:
    g = torch.Generator().manual_seed(p.tasks)
    lens = [p.tokens] * p.tasks
    h0 = torch.randn(sum(lens), p.hidden, generator=g).to(dtype).to(device)
    v0 = [torch.rand(p.hidden, generator=g).to(dtype).to(device) for _ in lens]
    dz = torch.randn_like(h0)

    def muxc(meta: bool):
        def make(backward: bool):
            h, v = _leaf(h0, backward), [_leaf(t, backward) for t in v0]

            def run():
                if meta:
                    segments_for.cache_clear()
                    _triton.clear_tables()
                z = multi_ia3(h, lens, v, impl="triton")
                if backward:
                    h.grad = None
                    z.backward(dz)
                return z

            return run

        return make

    def loop(backward: bool):
        h, v = _leaf(h0, backward), [_leaf(t, backward) for t in v0]

        def run():
            z = torch.cat([h[i * p.tokens:(i + 1) * p.tokens] * v[i] for i in range(p.tasks)])
            if backward:
                h.grad = None
                z.backward(dz)
            return z

        return run

    return {"muxc-triton": muxc(False), "muxc-triton+meta": muxc(True), "torch-loop": loop}


def _work(p: Point, backward: bool, elem: int) -> tuple[float, float]:
    """Useful (bytes, FLOPs) of one pass at ``p`` (see the module doc)."""
    t, h = p.tokens * p.tasks, p.hidden
    if p.op == "ia3":
        if backward:
            return elem * (5 * t * h + 3 * p.tasks * h), 3.0 * t * h
        return elem * (2 * t * h + p.tasks * h), float(t * h)
    r = sum(p.ranks)
    fwd_flops = 2.0 * p.tokens * r * (2 * h)
    if backward:
        return elem * (5 * t * h + 3 * r * 2 * h), 3 * fwd_flops
    return elem * (2 * t * h + r * 2 * h), fwd_flops


# ----------------------------------------------------------------------------- driver


def run(points: list[Point], dtype: torch.dtype, device: torch.device, reps: int,
        log: Callable[[str], None] = lambda s: None) -> tuple[list[dict], object]:
    """Measure every point; returns (rows, peaks)."""
    peak = harness.peaks(device, dtype)
    info = harness.machine(device)
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for i, p in enumerate(points):
        impls = (_lora_impls if p.op == "lora" else _ia3_impls)(p, dtype, device)
        for backward in (False, True):
            group = []
            for name, make in impls.items():
                fn = make(backward)
                fn()  # first call: compile / tune outside the timing
                slow = device.type == "cpu" and name.startswith("muxc-triton")
                # interpreted Triton takes 0.01-1 s a call and varies little: one timed run
                ms = harness.time_ms(fn, device, reps=1 if slow else reps, warmup=0 if slow else 1)
                row = dict(info, op=p.op, impl=name, pass_="fwd+bwd" if backward else "fwd",
                           tasks=p.tasks, tokens_per_task=p.tokens, hidden=p.hidden,
                           ranks=p.rank_mix, max_rank=max(p.ranks), dtype=str(dtype)[6:],
                           ms=round(ms, 4))
                row["tokens/s"] = round(p.tasks * p.tokens / (ms * 1e-3))
                nbytes, flops = _work(p, backward, elem)
                harness.add_rates(row, bytes_moved=nbytes, flops=flops, peak=peak)
                group.append(row)
            base = next(r["ms"] for r in group if r["impl"] == "torch-loop")
            for r in group:
                r["speedup_vs_loop"] = round(base / r["ms"], 3)
            rows += group
            log(f"[{i + 1}/{len(points)}] {p.op} tasks={p.tasks} tokens={p.tokens} "
                f"hidden={p.hidden} ranks={p.rank_mix} {'fwd+bwd' if backward else 'fwd'}: "
                + ", ".join(f"{r['impl']} {r['ms']:.3g} ms" for r in group))
    for r in rows:  # `pass` is a keyword; the CSV column is named plainly
        r["pass"] = r.pop("pass_")
    return rows, peak


def _pivot(rows: list[dict]) -> list[dict]:
    """One line per (point, pass) with every implementation's time side by side."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["tasks"], r["tokens_per_task"], r["hidden"], r["ranks"], r["pass"])
        line = out.setdefault(key, dict(zip(
            ("op", "tasks", "tokens/task", "hidden", "ranks", "pass"), key)))
        line[f"{r['impl']} ms"] = r["ms"]
        if r["impl"] == "muxc-triton":
            line["triton GB/s"] = r["GB/s"]
            line["triton TFLOP/s"] = r["TFLOP/s"]
            line["triton % roofline"] = round(100 * r["roofline_frac"], 2)
            line["triton vs loop"] = r["speedup_vs_loop"]
    for line in out.values():
        if "padded-bmm ms" in line:
            line["triton vs padded"] = round(line["padded-bmm ms"] / line["muxc-triton ms"], 3)
    return list(out.values())


def _plot(rows: list[dict], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (pip install matplotlib): no plot written"
    lora = [r for r in rows if r["op"] == "lora"]
    tokens, hidden = max(r["tokens_per_task"] for r in lora), max(r["hidden"] for r in lora)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for impl, color in (("muxc-triton", "C0"), ("muxc-triton+meta", "C9"),
                            ("torch-loop", "C3"), ("padded-bmm", "C2")):
            for mix, style in (("uniform-16", "--"), ("mixed-4..64", "-")):
                pts = sorted((r["tasks"], r["ms"]) for r in lora if r["impl"] == impl
                             and r["pass"] == pass_ and r["ranks"] == mix
                             and r["tokens_per_task"] == tokens and r["hidden"] == hidden)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", ms=3,
                            label=f"{impl} ({mix})")
        ax.set(xscale="log", yscale="log", xlabel="tasks", ylabel="ms",
               title=f"LoRA {pass_}: {tokens} tokens/task, hidden {hidden}")
        ax.set_xticks(TASKS, [str(t) for t in TASKS])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _markdown(rows, peak, device, dtype, args, png: Path, plot_note) -> str:
    info = harness.machine(device)
    interp = device.type == "cpu"
    lines = [
        f"# muxc kernel benchmark: {info['device']}",
        "",
        f"`muxc bench kernels{' --quick' if args.quick else ''}` on {info['timestamp']}, "
        f"commit {info['commit']}, torch {info['torch']}, triton {info['triton']}, "
        f"{str(dtype)[6:]}.",
        "",
        "Implementations, all timed in the same run on the same inputs: **muxc-triton** (one "
        "launch per kernel kind for all tasks, segment metadata cached as in steady state), "
        "**muxc-triton+meta** (metadata rebuilt every call), **torch-loop** (a GEMM pair per "
        "task, as separate HF PEFT adapters run), **padded-bmm** (ranks zero-padded to the "
        "maximum, one batched GEMM pair, as serving systems stack adapters). Times are "
        + ("`triton.testing.do_bench` medians." if not interp else
           "medians of repeated wall-clock runs."),
        "",
        f"Roofline: {peak.bytes_per_s / 1e9:.1f} GB/s, {peak.flops_per_s / 1e12:.2f} TFLOP/s "
        f"({peak.source}). Rates count the op's useful bytes and FLOPs (see "
        "`bench/kernels.py`), identical for every implementation.",
        "",
    ]
    if interp:
        lines += [
            "> **CPU run: the Triton columns run the Triton interpreter** (numpy, one program "
            "instance at a time), which is orders of magnitude slower than compiled Triton. "
            "They prove the kernels run and launch once per kind for any number of tasks; "
            "they say nothing about GPU speed. The torch baselines are real CPU numbers. "
            "GPU results are in `kernels-<gpu>.md` once a GPU run is committed.",
            "",
        ]
    if plot_note is None:
        lines += [f"![time vs tasks]({png.name})", ""]
    else:
        lines += [f"(no plot: {plot_note})", ""]
    pivot = _pivot(rows)
    for op in ("lora", "ia3"):
        sub = [r for r in pivot if r["op"] == op]
        if not sub:
            continue
        cols = [c for c in dict.fromkeys(k for r in sub for k in r) if c != "op"]
        if op == "ia3":
            cols = [c for c in cols if c != "ranks"]
        lines += [f"## {op.upper()}", "", harness.markdown_table(sub, cols), ""]
    tuned = _triton.TUNER.report()
    if tuned:
        lines += ["## Autotuned block sizes", "",
                  "Chosen per key (op, tasks, tokens rounded to a power of two, K, N, max rank, "
                  "dtype, device) by timing every candidate once; candidates and why they are "
                  "the candidates: `muxc/kernels/lora.py`, `muxc/kernels/ia3.py`.", "",
                  harness.markdown_table(tuned, list(tuned[0])), ""]
    elif interp:
        lines += ["Block sizes: the interpreter uses one large fixed config (no tuning).", ""]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="muxc bench kernels",
        description="Time the multi-adapter kernels against a per-task loop and padded bmm.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="small sweep (about 2 minutes on 2 CPU cores under the interpreter)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                    default="auto", help="auto: float16 on GPU, float32 on CPU")
    ap.add_argument("--reps", type=int, default=None,
                    help="CPU repeats per measurement (median); default 5, 3 with --quick")
    ap.add_argument("--out", type=Path, default=harness.RESULTS,
                    help="directory for kernels-<device>.csv/.md/.png")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU runs: torch intra-op threads (default 1: on small VMs, idle "
                         "OpenMP threads spin and stall small GEMMs by tens of ms)")
    ap.add_argument("--max-points", type=int, default=None, help="stop after this many points")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.kernels`` and ``muxc bench kernels``; prints progress
    and the output paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    device = resolve_device(args.device)
    if device is None:
        return 2
    if device.type == "cpu" and _triton.AVAILABLE and not _triton.interpreting():
        # The interpreter is chosen when triton decorates kernels, i.e. at import: start a
        # fresh interpreter-mode process for the CPU run (this is CLI code, env is ours).
        return subprocess.call([sys.executable, "-m", "bench.kernels", *argv], env=_child_env())
    if not _triton.AVAILABLE:
        print(f"error: {_triton.UNAVAILABLE_REASON}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _bench(args, device)
    finally:
        torch.set_num_threads(threads)


def _child_env() -> dict[str, str]:
    """This environment with the interpreter on, and ``PYTHONPATH`` leading to the `bench` and
    `muxc` imported here (the child may start in any directory: relative ``--out`` paths must
    mean what they mean here)."""
    roots = [str(harness.ROOT), str(Path(muxc.__file__).resolve().parents[1])]
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, TRITON_INTERPRET="1",
                PYTHONPATH=os.pathsep.join(dict.fromkeys(roots + old)))


def _bench(args: argparse.Namespace, device: torch.device) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.float16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (3 if args.quick else 5)
    points = sweep(args.quick, device)[: args.max_points]
    print(f"muxc bench kernels: {len(points)} points on {harness.device_name(device)}, "
          f"{str(dtype)[6:]}" + (" (triton columns: interpreter)" if device.type == "cpu" else ""))
    rows, peak = run(points, dtype, device, reps, log=lambda s: print(s, flush=True))
    slug = harness.device_slug(device)
    csv_path = args.out / f"kernels-{slug}.csv"
    md_path, png_path = csv_path.with_suffix(".md"), csv_path.with_suffix(".png")
    harness.write_csv(rows, csv_path)
    note = _plot(rows, png_path, f"muxc kernels on {harness.device_name(device)}, "
                                 f"{str(dtype)[6:]}")
    md_path.write_text(_markdown(rows, peak, device, dtype, args, png_path, note))
    for path in (csv_path, md_path) + (() if note else (png_path,)):
        print(f"wrote {path}")
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
