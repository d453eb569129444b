"""Errors and warnings raised by muxc.

Every user-facing error is a `MuxcError` subclass whose message says what is wrong, shows the
values involved and says how to fix it. Internal invariant violations raise `MuxcInternalError`
(a bug in muxc, not in the user's input). A `MuxcWarning` reports a task left out of a step
(no label tokens, non-finite loss or gradients, paused) while the other tasks go on.
"""

from __future__ import annotations

__all__ = [
    "MuxcError",
    "TaskSpecError",
    "UnsupportedPeftError",
    "ArchitectureMismatchError",
    "BaseWeightMismatchError",
    "TrainableBaseError",
    "BatchError",
    "AdmissionError",
    "UnsafePathError",
    "OptionsError",
    "KernelUnavailableError",
    "KernelInputError",
    "TraceError",
    "MuxcInternalError",
    "PipelineError",
    "CheckpointError",
    "StepOutOfMemoryError",
    "ConfigError",
    "MuxcWarning",
    "EmptyBatchWarning",
    "NonFiniteWarning",
    "TaskPausedWarning",
    "OutOfMemoryRetryWarning",
]


class MuxcError(Exception):
    """Base class of every error muxc raises on bad input."""


class TaskSpecError(MuxcError):
    """The task list itself is malformed (empty, duplicate names, wrong types)."""


class UnsupportedPeftError(MuxcError):
    """A PEFT method or option muxc does not implement yet."""


class ArchitectureMismatchError(MuxcError):
    """Two tasks do not share the same backbone architecture."""


class BaseWeightMismatchError(MuxcError):
    """Two tasks claim the same base model but a frozen weight differs."""


class TrainableBaseError(MuxcError):
    """A base (non-adapter) parameter requires grad, so it cannot be shared."""


class BatchError(MuxcError):
    """A batch passed to the program is malformed or names an unknown task."""


class AdmissionError(MuxcError):
    """A step was refused before it ran: a task's batch is over ``Options.max_task_tokens`` or
    the step's predicted memory is over ``Options.memory_budget``."""


class UnsafePathError(MuxcError):
    """A path muxc was asked to write does not lie under the directory it was given."""


class OptionsError(MuxcError):
    """An option value is unknown or inconsistent."""


class KernelUnavailableError(MuxcError):
    """A kernel implementation was forced but cannot run here."""


class KernelInputError(MuxcError):
    """A kernel was called with inconsistent shapes, dtypes or devices."""


class TraceError(MuxcError):
    """torch.export could not capture a task's model."""


class MuxcInternalError(RuntimeError):
    """An invariant of muxc itself was violated: a bug, please report it."""


def parse_enum(cls, value, name: str, error: type[MuxcError] = OptionsError):
    """``value`` as a member of enum ``cls`` (members pass through), or ``error`` naming the
    choices.

    >>> import enum
    >>> class Color(str, enum.Enum):
    ...     RED = "red"
    >>> parse_enum(Color, "red", "color")
    <Color.RED: 'red'>
    >>> parse_enum(Color, "blue", "color")
    Traceback (most recent call last):
    muxc.errors.OptionsError: color='blue' is not one of ['red']
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = [c.value for c in cls]
        raise error(f"{name}={value!r} is not one of {choices}") from None


class PipelineError(MuxcError):
    """A pipeline-stage process died, raised or stopped answering during a step."""


class CheckpointError(MuxcError):
    """A checkpoint cannot be written or does not fit the program it is loaded into (a file
    missing, tampered with or truncated; another program's tasks, shapes or options)."""


class StepOutOfMemoryError(MuxcError):
    """A step ran out of memory and could not be retried, or its retry with the failing hTask
    split ran out of memory too; the adapter gradients are as they were before the step."""


class ConfigError(MuxcError):
    """A `muxc train` config file is unreadable, has an unknown key, a value of the wrong type
    or range, or names a file that does not exist (the message names file, table and key)."""


class MuxcWarning(UserWarning):
    """Base class of muxc's warnings: a task was left out of a step; the others ran."""


class EmptyBatchWarning(MuxcWarning):
    """A task's batch has no label tokens (all -100 after the causal shift): it was skipped."""


class NonFiniteWarning(MuxcWarning):
    """A task's loss or adapter gradients were NaN/inf: its optimizer step was skipped."""


class TaskPausedWarning(MuxcWarning):
    """A task is paused after repeated non-finite steps: left out until ``resume_task``."""


class OutOfMemoryRetryWarning(MuxcWarning):
    """A step ran out of memory in a fused hTask and was run again with that hTask split."""
