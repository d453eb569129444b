"""muxc: a compiler for concurrent multi-task PEFT fine-tuning on one shared frozen backbone.

Not run as a doctest (it needs PEFT models; README "Using it" has the whole example):

>>> import muxc
>>> program = muxc.compile([muxc.Task(name="a", model=peft_a)])  # doctest: +SKIP
"""

from muxc.api import Program, compile
from muxc.errors import *  # noqa: F403  (every error and warning; listed in errors.__all__)
from muxc.errors import __all__ as _errors
from muxc.options import Fusion, Options
from muxc.runtime.training import StepOutcome
from muxc.task import Task
from muxc.version import __version__  # noqa: F401

__all__ = [
    "compile",
    "Program",
    "Task",
    "Options",
    "Fusion",
    "StepOutcome",
    *_errors,
]
