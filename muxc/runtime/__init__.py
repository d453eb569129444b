"""Runtimes that execute compiled programs."""

from muxc.runtime.batch import MuxBatch
from muxc.runtime.local import LocalExecutor

__all__ = ["LocalExecutor", "MuxBatch"]
