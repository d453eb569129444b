"""Typed, validated compile options."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from muxc.errors import OptionsError
from muxc.kernels.registry import Impl

__all__ = ["Options", "Fusion"]


class Fusion(str, Enum):
    """How tasks share the backbone in time and space."""

    AUTO = "auto"  # muxc chooses (spatial for now; the planner issue adds the DP)
    SPATIAL = "spatial"  # all tasks' tokens through each frozen op at once
    TEMPORAL = "temporal"  # tasks one after another on the same shared graph


def _enum(cls, value, name):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = [c.value for c in cls]
        raise OptionsError(f"{name}={value!r} is not one of {choices}") from None


@dataclass(kw_only=True, frozen=True)
class Options:
    """How to compile.

    fusion: "auto" | "spatial" | "temporal".
    kernel_impl: None (registry picks: Triton on CUDA, torch on CPU) | "torch" | "triton".
    verify: run invariant checks after every pass (slower compile; on in tests).

    >>> Options(fusion="temporal").fusion
    <Fusion.TEMPORAL: 'temporal'>
    """

    fusion: Fusion | str = Fusion.AUTO
    kernel_impl: Impl | str | None = None
    verify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion", _enum(Fusion, self.fusion, "fusion"))
        object.__setattr__(self, "kernel_impl", Impl.parse(self.kernel_impl))
        if not isinstance(self.verify, bool):
            raise OptionsError(f"verify must be a bool, got {self.verify!r}")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> Options:
        """Build from a mapping, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return Options(**values)
