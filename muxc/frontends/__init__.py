"""Frontends: turn a user's PEFT model into a `TaskGraph`."""

from muxc.frontends.export import trace_task

__all__ = ["trace_task"]
