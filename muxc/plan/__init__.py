"""muxc's planner: the cost model, the fusion DP, chunk-size choice, schedules and step plans.

- `ops`: op kinds and keys, work polynomials, the roofline fallback.
- `latency`: `LatencyModel`, flat below the saturation point and linear above, and its fit.
- `profile`: `profile_device` (a few-second micro-profile), `DeviceProfile` (JSON),
  `load_or_profile` (cached per device).
- `summary`: `summarize_graph(mux)` -> `ModelSummary` (work per op as polynomials in batch
  rows and sequence length); `config_summary.summarize_config` builds one from an HF config.
- `cost`: `CostModel` (fitted latency or roofline per op) and `estimate_step`.
- `memory`: `estimate_memory` (weights once + per-task training state + activations),
  `plan_peak_bytes` (a step plan's predicted peak, checked against ``memory_budget``).
- `stage_cost`: node cost policies the partition pass balances stages with (`FlopCost`,
  `LatencyCost`).
- `iteration`: the pipeline iteration-time formula and bubble fraction.
- `fusion_dp`: the exact hTask DP (`plan_fusion`); `fusion`: `AutoFusion`, which prices hTasks
  with the cost model and picks the chunk size.
- `schedule`: 1F1B / hTask-interleaved / sequential schedule builders; `simulate`: the
  schedule simulator and `best_schedule`.
- `step`: `plan_step` -> `StepPlan`, the one plan of a step that `explain()` prints and the
  runtime executes.

A summary from an HF config, priced by the CPU roofline (a compiled program's
``summarize_graph(program.mux)`` and a measured ``load_or_profile`` cost model work the same way):

>>> import transformers as T
>>> cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                     num_attention_heads=4, vocab_size=100)
>>> summary = summarize_config(cfg, {"a": AdapterSpec(rank=8, targets=("q_proj", "v_proj")),
...                                  "b": AdapterSpec(rank=4)})
>>> estimate_step(summary, {"a": 512, "b": 512}, seq_len=256, cost=CostModel.for_device("cpu"))
StepEstimate(1024 tokens (1024 padded), fwd 7.6 ms + bwd 11.3 ms = 18.9 ms)
"""

from muxc.plan.config_summary import AdapterSpec, summarize_config
from muxc.plan.cost import CostModel, StepEstimate, StepShape, estimate_step, saturation_tokens
from muxc.plan.iteration import bubble_fraction, pipeline_iteration_time
from muxc.plan.latency import LatencyModel, fit_latency
from muxc.plan.memory import (
    MemoryEstimate, activation_bytes_per_token_per_layer, estimate_memory, plan_peak_bytes,
)
from muxc.plan.ops import CostModelError, OpKey, OpKind, Poly, Roofline, roofline_latency
from muxc.plan.profile import Clock, DeviceProfile, Sample, load_or_profile, profile_device
from muxc.plan.summary import ModelSummary, OpCost, Work, as_summary, summarize_graph
from muxc.plan.stage_cost import FlopCost, LatencyCost
from muxc.plan.fusion_dp import plan_fusion
from muxc.plan.fusion import AutoFusion, loads_of
from muxc.ir.schedule import SchedulePolicy
from muxc.plan.schedule import build_schedule, pipeline_dependencies
from muxc.plan.simulate import best_schedule, simulate, time_table
from muxc.plan.step import Planner, plan_step

__all__ = [
    "AdapterSpec",
    "AutoFusion",
    "SchedulePolicy",
    "best_schedule",
    "build_schedule",
    "loads_of",
    "pipeline_dependencies",
    "plan_fusion",
    "plan_step",
    "Planner",
    "simulate",
    "time_table",
    "Clock",
    "CostModel",
    "CostModelError",
    "DeviceProfile",
    "FlopCost",
    "LatencyCost",
    "LatencyModel",
    "MemoryEstimate",
    "ModelSummary",
    "OpCost",
    "OpKey",
    "OpKind",
    "Poly",
    "Roofline",
    "Sample",
    "StepEstimate",
    "StepShape",
    "Work",
    "activation_bytes_per_token_per_layer",
    "as_summary",
    "bubble_fraction",
    "estimate_memory",
    "plan_peak_bytes",
    "estimate_step",
    "fit_latency",
    "load_or_profile",
    "pipeline_iteration_time",
    "profile_device",
    "roofline_latency",
    "saturation_tokens",
    "summarize_config",
    "summarize_graph",
]
