"""Loading the shared benchmark harness (``bench/harness.py`` of a source checkout)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["ROOT", "load_harness"]

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    """The ``bench/harness.py`` module (benchmarks run from a source checkout)."""
    path = ROOT / "bench" / "harness.py"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: muxc benchmarks run from a source checkout of muxc "
            "(the shared harness lives in bench/)"
        )
    if "muxc_bench_harness" in sys.modules:
        return sys.modules["muxc_bench_harness"]
    spec = importlib.util.spec_from_file_location("muxc_bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def resolve_device(name: str):
    """``"auto"`` -> cuda when visible else cpu; None (after printing why) when cuda is asked
    for but not visible. Benchmarks are CLI entries, so printing here is allowed."""
    import torch

    want = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return None
    return torch.device(want)
