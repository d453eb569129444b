"""Kernel tests: Triton runs compiled on CUDA, through the interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before triton decorates any kernel, i.e. before the first
``import muxc``; tests/conftest.py sets it too. The full parametrized matrix is marked ``slow``:
tests/conftest.py skips it under the interpreter unless selected with ``-m slow``; on a GPU
everything runs.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from muxc.kernels import _triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    if DEVICE.type == "cpu" and not _triton.interpreting():
        pytest.fail(
            "no CUDA and the Triton interpreter is off: TRITON_INTERPRET=1 must be set before "
            "muxc is imported (tests/conftest.py and tests/kernels/conftest.py do it)"
        )
    return DEVICE
