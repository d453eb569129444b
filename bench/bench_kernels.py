"""Kernel microbenchmark: ``python bench/bench_kernels.py [--quick]`` (same as
``muxc bench kernels``). The sweep, baselines and report live in `muxc.bench_kernels`; the
shared timing/roofline/CSV code in `bench/harness.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from muxc.bench_kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
