"""muxc's intermediate representations: what a program is, independent of how it is built or run.

- `graph`: `TaskGraph` (one task's export), `MuxGraph` (all tasks on one backbone), the typed
  node record `NodeInfo` (``node.meta["muxc"]``) and the unified adapter record `AdapterRecord`.
- `ops`: what a merged graph may contain besides aten ops (`OutputSite`, `InputSite`,
  `TaskLoss`, `ChunkAttention`) and the per-step layout contract they read (`MuxBatch`).
- `prefix`: `PrefixAttention`, an attention call giving prefix-tuning tasks their trained K/V.
- `partition`: the merged graph cut into subgraphs (COMPUTE/PEFT/COMMUNICATE) and stages.
- `schedule`: per-stage ordered forward/backward steps with their dependencies; `SimResult`.
- `chunks`: the chunk layout of a step (streams cut into equal chunks, masks, kept-K/V gathers).
- `step`: `StepPlan`, one step's plan (hTasks, micro-batches, schedule) that the runtime runs.
- `text`: the fixed-width tables every IR prints.
- `optable`: what muxc knows about aten ops (GEMMs, views and aliases, free ops, attention).
- `shapes`: a merged graph's sizes as expressions in batch rows and sequence length
  (`GraphShapes`), or evaluated at a `ShapeHint` (`SizesAt`).

Rule: this package imports nothing of muxc but `muxc.errors`; everything else imports it.
"""

from muxc.ir.graph import (
    META_KEY,
    AdapterKind,
    AdapterRecord,
    Aggregate,
    Binding,
    BindingKind,
    Dispatch,
    MuxGraph,
    NodeInfo,
    Position,
    Role,
    TaskGraph,
    copy_graph,
    info,
    set_info,
)
from muxc.ir.ops import (
    IGNORE_INDEX,
    SDPA,
    CAUSAL_LM,
    ChunkAttention,
    HeadInfo,
    HeadLoss,
    InputSite,
    MuxBatch,
    OutputSite,
    TaskLoss,
    LMHeadLoss,
    bind_site_impl,
    causal_lm_loss,
    seq_cls_loss,
)
from muxc.ir.prefix import PrefixAttention, prefix_kv
from muxc.ir.partition import Crossing, PartitionedGraph, ShapeHint, Stage, Subgraph, SubgraphKind
from muxc.ir.schedule import Schedule, SchedulePolicy, ScheduleError, SimResult, Step, StepKind
from muxc.ir.step import FusionPlan, GroupCost, HTask, HTaskCost, StepPlan
from muxc.ir.text import table

__all__ = [
    "META_KEY",
    "copy_graph",
    "AdapterKind",
    "AdapterRecord",
    "Aggregate",
    "Binding",
    "BindingKind",
    "ChunkAttention",
    "Crossing",
    "Dispatch",
    "FusionPlan",
    "GroupCost",
    "HTask",
    "HTaskCost",
    "IGNORE_INDEX",
    "InputSite",
    "MuxBatch",
    "MuxGraph",
    "NodeInfo",
    "OutputSite",
    "PartitionedGraph",
    "PrefixAttention",
    "Position",
    "Role",
    "SDPA",
    "Schedule",
    "ScheduleError",
    "SchedulePolicy",
    "ShapeHint",
    "Stage",
    "Step",
    "StepPlan",
    "SimResult",
    "StepKind",
    "Subgraph",
    "SubgraphKind",
    "TaskGraph",
    "TaskLoss",
    "LMHeadLoss",
    "HeadInfo",
    "HeadLoss",
    "CAUSAL_LM",
    "seq_cls_loss",
    "bind_site_impl",
    "causal_lm_loss",
    "info",
    "prefix_kv",
    "set_info",
    "table",
]
