"""The benchmark harness shared by every driver of the `bench` package: where results go,
device choice, timing, machine facts, rooflines, tidy CSV and markdown.

Timing: on CUDA ``triton.testing.do_bench`` (median; it flushes L2 between runs); on CPU the
median of ``reps`` wall-clock runs after ``warmup`` runs. Rooflines: the peak bandwidth and
FLOP/s of known GPUs come from their datasheets; on CPU (or an unknown GPU) both are
*measured* here (a large tensor copy and a large matmul), and the table says which.

>>> row = {"ms": 2.0}
>>> add_rates(row, bytes_moved=4e9, flops=1e9, peak=Peaks(2e12, 1e15, "spec"))
>>> row["GB/s"], row["TFLOP/s"], row["roofline_frac"]
(2000.0, 0.5, 1.0)
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ROOT",
    "RESULTS",
    "resolve_device",
    "Peaks",
    "peaks",
    "time_ms",
    "device_name",
    "device_slug",
    "machine",
    "add_rates",
    "write_csv",
    "markdown_table",
]

ROOT = Path(__file__).resolve().parents[1]
"""The source checkout the `bench` package belongs to."""
RESULTS = ROOT / "bench" / "results"
"""Where the drivers write their CSV, markdown and plots unless told otherwise (``--out``)."""


def resolve_device(name: str) -> torch.device | None:
    """``"auto"`` -> cuda when visible else cpu; None (after printing why) when cuda is asked
    for but not visible. The drivers are command-line entries, so printing here is allowed."""
    want = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return None
    return torch.device(want)


def device_name(device: torch.device) -> str:
    """Human name of ``device``: the GPU's marketing name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device tag: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def machine(device: torch.device) -> dict[str, str]:
    """The columns every result row carries: where, what and when it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "missing"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:
        commit = ""
    threads = torch.get_num_threads()
    return {
        "host": platform.node(),
        "device": device_name(device) + ("" if device.type == "cuda" else f" ({threads} thr)"),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit or "unknown",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 5,
            warmup: int = 1) -> float:
    """Median milliseconds of one ``fn()`` call (see module doc for the method per device)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


@dataclass(frozen=True)
class Peaks:
    """A device's roofline: bytes/s, FLOP/s for the dtype, and where the numbers came from."""

    bytes_per_s: float
    flops_per_s: float
    source: str


# Datasheet peaks (dense, no sparsity): HBM bandwidth, and FLOP/s for fp16/bf16 tensor cores
# and for IEEE fp32 (the muxc kernels never use TF32). Keyed by a substring of the name.
_DATASHEET = {
    "h200": (4.8e12, {"half": 989e12, "float": 67e12}),
    "h100 pcie": (2.0e12, {"half": 756e12, "float": 51e12}),
    "h100": (3.35e12, {"half": 989e12, "float": 67e12}),
    "a100": (2.0e12, {"half": 312e12, "float": 19.5e12}),
}


def peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    """Roofline of ``device`` for ``dtype``: datasheet for known GPUs, else measured here."""
    kind = "float" if dtype == torch.float32 else "half"
    if device.type == "cuda":
        name = device_name(device).lower()
        for key, (bw, flops) in _DATASHEET.items():
            if key in name:
                return Peaks(bw, flops[kind], f"datasheet ({key})")
    return _measured_peaks(device, dtype)


def _measured_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    n = 1 << 25 if device.type == "cpu" else 1 << 28  # 128 MB / 1 GB of fp32: beyond caches
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, reps=5, warmup=2)
    m = 1024 if device.type == "cpu" else 8192
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    mm_ms = time_ms(lambda: a @ b, device, reps=3, warmup=1)
    return Peaks(
        bytes_per_s=2 * n * 4 / (copy_ms * 1e-3),
        flops_per_s=2 * m**3 / (mm_ms * 1e-3),
        source=f"measured here (tensor copy of {n * 4 >> 20} MB, {m}^3 {str(dtype)[6:]} matmul)",
    )


def add_rates(row: dict, *, bytes_moved: float, flops: float, peak: Peaks) -> None:
    """Add GB/s, TFLOP/s and the roofline fraction (best possible time / measured time) to a
    row that has ``ms``."""
    s = row["ms"] * 1e-3
    bound = max(bytes_moved / peak.bytes_per_s, flops / peak.flops_per_s)
    row["GB/s"] = _sig(bytes_moved / s / 1e9)
    row["TFLOP/s"] = _sig(flops / s / 1e12)
    row["roofline_frac"] = _sig(bound / s)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a slow interpreted kernel's rate (1e-5 GB/s)
    stays positive where rounding to fixed decimals made it 0."""
    return float(f"{x:.{digits}g}")


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Tidy CSV: one row per measurement, the union of keys as columns (first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """A GitHub markdown table of ``cols`` (missing cells blank, floats shortened)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
