"""Kernel tests: Triton runs compiled on CUDA, through the interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before triton decorates any kernel, i.e. before the first
``import muxc``; tests/conftest.py sets it too (this keeps tests/kernels runnable alone).
Under the interpreter the full parametrized matrix is marked ``slow`` and skipped unless
selected with ``-m slow``; on a GPU everything runs.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from muxc.kernels import _triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda" or config.getoption("-m"):
        return
    skip = pytest.mark.skip(
        reason="full kernel matrix: runs on GPU, or under the interpreter with -m slow"
    )
    for item in items:
        if str(item.path).startswith(KERNEL_DIR) and "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    if DEVICE.type == "cpu" and not _triton.interpreting():
        pytest.fail(
            "no CUDA and the Triton interpreter is off: TRITON_INTERPRET=1 must be set before "
            "muxc is imported (tests/conftest.py and tests/kernels/conftest.py do it)"
        )
    return DEVICE
