"""Runtimes that execute compiled programs."""

from muxc.ir import MuxBatch
from muxc.runtime import sites  # noqa: F401  (binds how adapter sites run)
from muxc.runtime.local import LocalExecutor

__all__ = ["LocalExecutor", "MuxBatch"]
