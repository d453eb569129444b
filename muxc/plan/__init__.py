"""muxc's planner, part 1: the cost model.

- `ops`: op kinds and keys, work polynomials, the roofline fallback.
- `latency`: `LatencyModel`, flat below the saturation point and linear above, and its fit.
- `profile`: `profile_device` (a few-second micro-profile), `DeviceProfile` (JSON),
  `load_or_profile` (cached per device).
- `summary`: `summarize_graph(mux)` -> `ModelSummary` (work per op as polynomials in batch
  rows and sequence length); `config_summary.summarize_config` builds one from an HF config.
- `cost`: `CostModel` (fitted latency or roofline per op) and `estimate_step`.
- `memory`: `estimate_memory` (weights once + per-task training state + activations).
- `iteration`: the pipeline iteration-time formula and bubble fraction.

A summary from an HF config, priced by the CPU roofline (a compiled program's
``summarize_graph(program.mux)`` and a measured ``load_or_profile`` cost model work the same way):

>>> import transformers as T
>>> cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                     num_attention_heads=4, vocab_size=100)
>>> summary = summarize_config(cfg, {"a": AdapterSpec(rank=8, targets=("q_proj", "v_proj")),
...                                  "b": AdapterSpec(rank=4)})
>>> estimate_step(summary, {"a": 512, "b": 512}, seq_len=256, cost=CostModel.for_device("cpu"))
StepEstimate(1024 tokens (1024 padded), fwd 8.4 ms + bwd 11.6 ms = 20.0 ms)
"""

from muxc.plan.config_summary import AdapterSpec, summarize_config
from muxc.plan.cost import CostModel, StepEstimate, StepShape, estimate_step, saturation_tokens
from muxc.plan.iteration import bubble_fraction, pipeline_iteration_time
from muxc.plan.latency import LatencyModel, fit_latency
from muxc.plan.memory import MemoryEstimate, activation_bytes_per_token_per_layer, estimate_memory
from muxc.plan.ops import CostModelError, OpKey, OpKind, Poly, Roofline, roofline_latency
from muxc.plan.profile import Clock, DeviceProfile, Sample, load_or_profile, profile_device
from muxc.plan.summary import ModelSummary, OpCost, Work, as_summary, summarize_graph

__all__ = [
    "AdapterSpec",
    "Clock",
    "CostModel",
    "CostModelError",
    "DeviceProfile",
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
