"""Typed, validated compile options."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from muxc.errors import OptionsError, parse_enum
from muxc.ir.recompute import Recompute
from muxc.ir.schedule import SchedulePolicy
from muxc.kernels.registry import Impl

__all__ = ["Options", "Fusion", "Alignment", "Recompute"]


class Fusion(str, Enum):
    """How tasks share the backbone in time and space."""

    AUTO = "auto"  # the fusion DP chooses hTasks per step from the cost model
    SPATIAL = "spatial"  # all tasks' tokens through each frozen op at once
    TEMPORAL = "temporal"  # tasks one after another on the same shared graph


class Alignment(str, Enum):
    """How tasks' samples are laid out in a fused batch."""

    PAD = "pad"  # each sample a row, right-padded to the step's longest sample
    CHUNK = "chunk"  # samples packed per task along the sequence axis, cut into equal chunks


@dataclass(kw_only=True, frozen=True)
class Options:
    """How to compile.

    fusion: "auto" | "spatial" | "temporal".
    alignment: "pad" | "chunk" (pack each task's samples into streams cut into equal chunks of
      ``chunk_size`` tokens; exact attention through document masks and kept K/V).
    chunk_size: tokens per chunk (>= 1); None: the planner picks one per hTask and step (the
      cost model's fastest on the packed samples, up to the hTask's longest sample).
    stages: pipeline stages the backbone is cut into (1..number of subgraphs). In a
      torch.distributed group of ``stages`` processes (e.g. torchrun), rank r runs stage r;
      otherwise every stage runs in this process, in the plan's order.
    micro_batches: micro-batches per hTask with alignment="pad" (None: one per task row
      group); with alignment="chunk" an hTask's micro-batches are its chunk steps.
    memory_budget: bytes the fusion planner must stay under (None: unlimited); a training step
      whose plan is predicted to peak above it is refused with `AdmissionError` before it runs.
    cost_model: path of a device profile (JSON) for the cost model; keys it lacks (or all, when
      it is missing or from another device) are profiled in a child process at first use and
      saved back (`muxc.plan.isolated`). None: the analytic roofline of the device.
    kernel_impl: None (registry picks: Triton on CUDA, grouped on CPU) | "grouped" (CPU multi-task
      GEMMs, no per-task loop where it pays) | "torch" (per-task reference loop) | "triton".
    verify: run invariant checks after every pass (slower compile; on in tests).
    schedule: None (the simulator picks the faster of "interleaved" and "1f1b" per step) |
      "1f1b" | "interleaved" | "sequential": how each stage orders the hTasks' micro-batches.
    pipeline_timeout: seconds a stage process waits for another before the step fails with
      `PipelineError` (multi-process stages only).
    recompute: None | "none" | "layers" | "auto": what a step keeps for backward (compile-time).
      "none": everything autograd saves (but an adapter input made by cheap ops from tensors
      their backward keeps, like a norm's output, is computed again from those: pass
      ``replay_adapter_inputs``, bit for bit); "layers": only each decoder layer's inputs, the layer
      runs again in backward (like HF gradient checkpointing); "auto": each layer's inputs and
      the outputs that cost the most time to recompute per byte (attention, GEMMs; chosen by the
      cost model to keep the predicted step within 1.3x of "none"), the rest runs again. None (the
      default): "layers" when a task's model has gradient checkpointing enabled
      (``gradient_checkpointing_enable()``; with ``every_n_layers``, those layers), else "none".
    max_bad_steps: consecutive steps with a non-finite loss or adapter gradient after which a
      task is paused (its steps are skipped until ``program.resume_task(name)``); each bad step
      is skipped without touching the adapter.
    max_task_tokens: tokens (rows x sequence length, padding included) one task may bring to one
      step (None: no limit). A batch over it is refused with `AdmissionError` before anything
      runs, so one tenant cannot push the process out of memory for all. ``memory_budget`` is
      checked at the same point against the step plan's predicted peak.

    >>> Options(fusion="temporal").fusion
    <Fusion.TEMPORAL: 'temporal'>
    """

    fusion: Fusion | str = Fusion.AUTO
    alignment: Alignment | str = Alignment.PAD
    chunk_size: int | None = None
    stages: int = 1
    micro_batches: int | None = None
    memory_budget: int | None = None
    cost_model: str | None = None
    kernel_impl: Impl | str | None = None
    verify: bool = False
    pipeline_timeout: float = 60.0
    schedule: SchedulePolicy | str | None = None
    max_bad_steps: int = 3
    recompute: Recompute | str | None = None
    max_task_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion", parse_enum(Fusion, self.fusion, "fusion"))
        object.__setattr__(self, "alignment", parse_enum(Alignment, self.alignment, "alignment"))
        object.__setattr__(self, "kernel_impl", Impl.parse(self.kernel_impl))
        if self.schedule is not None:
            object.__setattr__(self, "schedule", parse_enum(SchedulePolicy, self.schedule, "schedule"))
        if self.recompute is not None:
            object.__setattr__(self, "recompute", parse_enum(Recompute, self.recompute, "recompute"))
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
                raise OptionsError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
            if self.alignment is not Alignment.CHUNK:
                raise OptionsError(
                    f"chunk_size={self.chunk_size} needs alignment='chunk' (alignment is "
                    f"{self.alignment.value!r}); set alignment='chunk' or drop chunk_size"
                )
        for name in ("stages", "micro_batches", "memory_budget", "max_bad_steps", "max_task_tokens"):
            value = getattr(self, name)
            required = name in ("stages", "max_bad_steps")
            if value is None and not required:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                kind = "a positive int" if required else "a positive int or None"
                raise OptionsError(f"{name} must be {kind}, got {value!r}")
        if self.micro_batches is not None and self.alignment is Alignment.CHUNK:
            raise OptionsError(
                f"micro_batches={self.micro_batches} applies to alignment='pad'; with alignment='chunk' "
                "the micro-batches are the chunk steps (set chunk_size instead)"
            )
        if self.cost_model is not None and not isinstance(self.cost_model, (str, os.PathLike)):
            raise OptionsError(f"cost_model must be a path or None, got {self.cost_model!r}")
        if isinstance(self.pipeline_timeout, bool) or not isinstance(self.pipeline_timeout, (int, float)) \
                or not self.pipeline_timeout > 0:
            raise OptionsError(f"pipeline_timeout must be seconds > 0, got {self.pipeline_timeout!r}")
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
