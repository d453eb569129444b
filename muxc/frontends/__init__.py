"""Frontends: turn a user's PEFT model into a `TaskGraph` (one export per task structure)."""

from muxc.frontends.cache import (
    SharedTemplates,
    TraceCache,
    TraceTemplates,
    clear_shared_templates,
    set_shared_templates_size,
    shared_templates,
)
from muxc.frontends.export import trace_task
from muxc.frontends.signature import TraceSignature, trace_signature

__all__ = [
    "trace_task",
    "TraceCache",
    "TraceTemplates",
    "TraceSignature",
    "trace_signature",
    "SharedTemplates",
    "shared_templates",
    "clear_shared_templates",
    "set_shared_templates_size",
]
