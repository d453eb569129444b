"""Frontends: turn a user's PEFT model into a `TaskGraph` (one export per task structure)."""

from muxc.frontends.cache import TraceCache, TraceTemplates
from muxc.frontends.export import trace_task
from muxc.frontends.signature import TraceSignature, trace_signature

__all__ = ["trace_task", "TraceCache", "TraceTemplates", "TraceSignature", "trace_signature"]
