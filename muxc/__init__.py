"""muxc: a compiler for concurrent multi-task PEFT fine-tuning on one shared frozen backbone.

Not run as a doctest (it needs PEFT models; README "Using it" has the whole example):

>>> import muxc
>>> program = muxc.compile([muxc.Task(name="a", model=peft_a)])  # doctest: +SKIP
"""

from muxc.api import Program, compile
from muxc.errors import (
    ArchitectureMismatchError,
    BaseWeightMismatchError,
    BatchError,
    KernelInputError,
    KernelUnavailableError,
    MuxcError,
    MuxcInternalError,
    OptionsError,
    TaskSpecError,
    TraceError,
    TrainableBaseError,
    UnsupportedPeftError,
)
from muxc.options import Fusion, Options
from muxc.task import Task

__all__ = [
    "compile",
    "Program",
    "Task",
    "Options",
    "Fusion",
    "MuxcError",
    "TaskSpecError",
    "UnsupportedPeftError",
    "ArchitectureMismatchError",
    "BaseWeightMismatchError",
    "TrainableBaseError",
    "BatchError",
    "OptionsError",
    "KernelUnavailableError",
    "KernelInputError",
    "TraceError",
    "MuxcInternalError",
]
__version__ = "0.1.0"
