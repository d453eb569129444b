"""The operations a merged graph may contain besides aten ops, and the per-step batch they read.

- `MuxBatch`: the layout contract of one step (which tasks, how many rows each, labels, the
  chunk step being run and the K/V kept across chunks). The graph takes it as its ``mux`` input.
- `OutputSite` / `InputSite`: one node per adapted base op serving every task's adapter there
  (one multi-task kernel call per adapter kind). They are immutable records; HOW a site runs is
  supplied by the runtime (`bind_site_impl`), so this module needs no kernels.
- `TaskLoss`: one task's loss on its own rows of the shared logits.
- `LMHeadLoss`: a frozen LM head and one task's loss fused (`muxc.passes.fuse_lm_head_loss`).
- `ChunkAttention`: the backbone's attention, able to attend to K/V kept by earlier chunks.

>>> TaskLoss("sst2"), ChunkAttention(3)
(TaskLoss(sst2), ChunkAttention(3))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from muxc.errors import MuxcInternalError, UnsupportedPeftError
from muxc.ir.graph import AdapterRecord, Position

__all__ = [
    "IGNORE_INDEX",
    "SDPA",
    "MuxBatch",
    "OutputSite",
    "InputSite",
    "TaskLoss",
    "LMHeadLoss",
    "HeadInfo",
    "HeadLoss",
    "seq_cls_loss",
    "ChunkAttention",
    "bind_site_impl",
    "causal_lm_loss",
]

IGNORE_INDEX = -100
SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_ARGS = tuple(a.name for a in SDPA._schema.arguments)


@dataclass(frozen=True)
class MuxBatch:
    """The runtime context passed to the merged graph as its ``mux`` input.

    Each active task's rows are stacked task after task at one sequence length, so every task's
    tokens form one contiguous segment of the flattened ``(rows * seq, hidden)`` activations.
    """

    tasks: tuple[str, ...]  # active tasks, in layout order
    rows: tuple[int, ...]  # batch rows per active task
    seq_len: int
    labels: tuple[torch.Tensor, ...]  # (rows_i, seq_len), padded with IGNORE_INDEX
    impl: Any = None  # the kernel implementation requested (a `muxc.kernels.Impl`), None = registry
    training: bool = True
    shifted: bool = False  # labels already shifted within each sample (chunk alignment)
    loss_scale: tuple[float, ...] | None = None  # per task: 1 / its label count this step
    chunk: Any = None  # the ChunkStep being run (chunk alignment), else None
    kv: dict | None = None  # K/V kept across an hTask's chunk steps: attention node -> (K, V)
    # per active task: the row positions a sequence-classification head pools (its last
    # non-padding token), None for other tasks; None when no such task is in the batch
    pooled: tuple[torch.Tensor | None, ...] | None = None

    @property
    def seg_lens(self) -> tuple[int, ...]:
        """Tokens per active task in the flattened layout."""
        return tuple(r * self.seq_len for r in self.rows)

    def row_range(self, task: str) -> tuple[int, int] | None:
        """``(start, end)`` rows of ``task``, or None when it is not in this batch."""
        part = self.task_part(task)
        return None if part is None else part[1:]

    def task_part(self, task: str) -> tuple[int, int, int] | None:
        """``(index in tasks, start row, end row)`` of ``task``, or None when it is not in
        this batch."""
        if task not in self.tasks:
            return None
        i = self.tasks.index(task)
        start = sum(self.rows[:i])
        return i, start, start + self.rows[i]

    def tokens(self) -> int:
        return sum(self.rows) * self.seq_len


# ---------------------------------------------------------------------------- adapter sites

_SITE_IMPLS: dict[type, Callable[..., torch.Tensor]] = {}


def bind_site_impl(site_type: type, fn: Callable[..., torch.Tensor]) -> None:
    """Supply how ``site_type`` nodes run: ``fn(site, *node_args)`` for the sites,
    ``fn(hidden_rows, weight, bias, labels, scale)`` for `LMHeadLoss` (the runtime does this
    once, when `muxc.runtime` is imported)."""
    _SITE_IMPLS[site_type] = fn


def common_dtype(records: tuple[AdapterRecord, ...], site: str) -> torch.dtype | None:
    """The one dtype of ``records``' parameters (None without parameters)."""
    dtypes = {p.dtype for r in records for p in r.params.values()}
    if len(dtypes) > 1:
        raise UnsupportedPeftError(
            f"site {site!r}: tasks' adapters have different dtypes {sorted(map(str, dtypes))}; "
            "cast every task's adapter to one dtype"
        )
    return dtypes.pop() if dtypes else None


@dataclass(frozen=True, eq=False)
class _Site:
    site: str
    records: tuple[AdapterRecord, ...]  # graph args after (x[, h], mux, *frozen) are these records' params
    frozen: tuple[str, ...] = ()  # names of the frozen backbone tensors passed after mux (DoRA: weight, bias)

    def __post_init__(self) -> None:
        common_dtype(self.records, self.site)
        # fx code generation names a call_function target by __name__
        object.__setattr__(self, "__name__", f"{type(self).__name__}_{self.site.replace('.', '_')}")

    @cached_property
    def by_kind(self) -> dict[Any, dict[str, AdapterRecord]]:
        """Adapter kind -> task -> its record here (built once: a site runs per chunk step and
        layer, and regrouping its records on every call cost more than some adapters)."""
        out: dict[Any, dict[str, AdapterRecord]] = {}
        for r in self.records:
            out.setdefault(r.kind, {})[r.task] = r
        return out

    def params_by_task(self, flat_params) -> dict[str, dict[str, torch.Tensor]]:
        """The flat parameter arguments of a call, as task -> name -> tensor."""
        out, i = {}, 0
        for r in self.records:  # a task may hold several kinds here (a trained bias and LoRA)
            n = len(r.params)
            out.setdefault(r.task, {}).update(zip(r.params, flat_params[i : i + n]))
            i += n
        if i != len(flat_params):
            raise MuxcInternalError(f"site {self.site!r}: expected {i} params, got {len(flat_params)}")
        return out

    def __call__(self, *args) -> torch.Tensor:
        impl = _SITE_IMPLS.get(type(self))
        if impl is None:
            raise MuxcInternalError(
                f"no runtime implementation bound for {type(self).__name__}; import muxc.runtime"
            )
        return impl(self, *args)

    def __repr__(self) -> str:
        kinds = ",".join(f"{r.task}:{r.kind.value}" for r in self.records)
        return f"{type(self).__name__}({self.site}; {kinds})"


class OutputSite(_Site):
    """After a base op, called as ``(x, h, mux, *frozen, *params)``: each task's adapter on its
    segment (LoRA ``h + s*B(A(x))``, IA3 ``h * v``, DoRA, which also reads the base op's frozen
    weight and bias named in ``frozen``)."""


class InputSite(_Site):
    """Before a base op, called as ``(x, mux, *params)``: ``x * v`` for IA3 feed-forward tasks
    (the base op then reads it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(r.position is not Position.IN for r in self.records):
            raise MuxcInternalError(f"InputSite {self.site!r} given an output-side adapter")


# ---------------------------------------------------------------------------- losses

def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: next-token cross-entropy in fp32, ignoring -100, mean over tokens."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="mean",
    )


@dataclass(frozen=True)
class _TaskLossOp:
    """What the per-task loss ops share: the task, a graph name ``<_PREFIX>_<task>`` and the
    task's part of a step's batch."""

    task: str
    _PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", f"{self._PREFIX}_{self.task}")

    def _part(self, mux: MuxBatch) -> tuple[int, int, int, torch.Tensor] | None:
        """``(index in mux.tasks, start row, end row, labels)``, None when the task is not in
        this batch."""
        part = mux.task_part(self.task)
        return None if part is None else (*part, mux.labels[part[0]])


@dataclass(frozen=True)
class TaskLoss(_TaskLossOp):
    """One task's loss on its own rows of the shared logits (None when the task is inactive).

    Without ``mux.loss_scale`` it is HF's mean loss of the rows; with it (chunk steps, pad
    micro-batches) it is this part's share: the summed token losses times the task's scale.
    """

    _PREFIX: ClassVar[str] = "loss"

    def __call__(self, logits: torch.Tensor, mux: MuxBatch) -> torch.Tensor | None:
        part = self._part(mux)
        if part is None:
            return None
        i, start, end, labels = part
        if mux.loss_scale is None:
            return causal_lm_loss(logits[start:end], labels)
        if not mux.shifted:
            labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        part = logits[start:end]
        total = F.cross_entropy(
            part.float().reshape(-1, part.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total * mux.loss_scale[i]

    def __repr__(self) -> str:
        return f"TaskLoss({self.task})"


@dataclass(frozen=True)
class LMHeadLoss(_TaskLossOp):
    """`TaskLoss` of the shared frozen LM head's logits, fused with the head: called as
    ``(hidden, mux, weight[, bias])``, it computes the task's rows of the logits and their
    loss in token blocks (`muxc.kernels.lm_head_loss`, bound by the runtime as sites are:
    `bind_site_impl`), keeping only the gradient w.r.t. its
    hidden rows for backward, never the rows' ``tokens x vocab`` logits. Same value and
    gradients as ``TaskLoss(task)(linear(hidden, weight, bias), mux)``."""

    _PREFIX: ClassVar[str] = "lm_head_loss"

    def __call__(self, hidden: torch.Tensor, mux: MuxBatch, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
        part = self._part(mux)
        if part is None:
            return None
        i, start, end, labels = part
        if mux.loss_scale is None or not mux.shifted:
            labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        scale = None if mux.loss_scale is None else mux.loss_scale[i]
        impl = _SITE_IMPLS.get(LMHeadLoss)
        if impl is None:
            raise MuxcInternalError("no runtime implementation bound for LMHeadLoss; import muxc.runtime")
        return impl(hidden[start:end], weight, bias, labels.to(hidden.device), scale)

    def __repr__(self) -> str:
        return f"LMHeadLoss({self.task})"


SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class HeadInfo:
    """What a task with its own head computes: ``problem`` is ``"causal_lm"`` (its own copy of
    the LM head) or ``"seq_cls"`` (HF's sequence classification: the head's logits at each
    row's last non-padding token); ``problem_type`` is the model config's (None: decided per
    batch from the labels, as HF does on its first call)."""

    problem: str
    num_labels: int = 0
    problem_type: str | None = None
    pad_token_id: int | None = None

    def resolved_problem_type(self, labels: torch.Tensor) -> str:
        """HF's choice (``ForSequenceClassificationLoss``) for these labels."""
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return REGRESSION
        if labels.dtype in (torch.long, torch.int):
            return SINGLE_LABEL
        return MULTI_LABEL

    def pooled_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Each row's last non-padding token, computed as HF's sequence classifiers do (the
        rightmost id that is not ``pad_token_id``; the last column without a pad token id)."""
        if self.pad_token_id is None:
            rows = ids.shape[0]
            return torch.full((rows,), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        non_pad = (ids != self.pad_token_id).to(torch.int32)
        cols = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
        return (cols * non_pad).argmax(-1)

    def label_count(self, labels: torch.Tensor) -> int:
        """How many terms HF's mean loss over ``labels`` averages."""
        kind = self.resolved_problem_type(labels)
        if kind == SINGLE_LABEL:
            return int((labels != IGNORE_INDEX).sum())
        return int(labels.numel())


def seq_cls_loss(pooled: torch.Tensor, labels: torch.Tensor, head: HeadInfo, reduction: str) -> torch.Tensor:
    """HF's sequence-classification loss of pooled logits ``(rows, num_labels)``."""
    kind = head.resolved_problem_type(labels)
    labels = labels.to(pooled.device)
    if kind == REGRESSION:
        if head.num_labels == 1:
            return F.mse_loss(pooled.reshape(-1), labels.reshape(-1).to(pooled.dtype), reduction=reduction)
        return F.mse_loss(pooled, labels.to(pooled.dtype), reduction=reduction)
    if kind == SINGLE_LABEL:
        return F.cross_entropy(pooled.reshape(-1, head.num_labels), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype), reduction=reduction)


@dataclass(frozen=True)
class HeadLoss(_TaskLossOp):
    """The loss of a task with its own head, called as ``(hidden, mux, weight[, bias])``: its
    rows of the shared last hidden state through its head copy, then HF's loss for its
    `HeadInfo` (causal LM, or sequence classification pooled at ``mux.pooled``: a column per
    row, or in a chunk step ``(k, 2)`` (row, column) pairs of the samples whose last token it
    holds, ``mux.labels`` then being those samples' labels). With ``mux.loss_scale`` it is
    this part's share (summed terms times the scale)."""

    head: HeadInfo
    _PREFIX: ClassVar[str] = "head_loss"

    def __call__(self, hidden: torch.Tensor, mux: MuxBatch, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
        part = self._part(mux)
        if part is None:
            return None
        i, start, end, labels = part
        rows = hidden[start:end]
        if self.head.problem == CAUSAL_LM:
            logits = F.linear(rows.to(weight.dtype), weight, bias)
            return TaskLoss(self.task)(logits, MuxBatch(
                tasks=(self.task,), rows=(end - start,), seq_len=mux.seq_len, labels=(labels,),
                shifted=mux.shifted, loss_scale=None if mux.loss_scale is None else (mux.loss_scale[i],)))
        pos = mux.pooled[i].to(rows.device)
        if pos.dim() == 2:  # chunk step: (row, column) of each sample pooled here
            picked = rows[pos[:, 0], pos[:, 1]]
        else:
            picked = rows[torch.arange(rows.shape[0], device=rows.device), pos]
        pooled = F.linear(picked.to(weight.dtype), weight, bias)
        if mux.loss_scale is None:
            return seq_cls_loss(pooled, labels, self.head, "mean")
        return seq_cls_loss(pooled, labels, self.head, "sum") * mux.loss_scale[i]

    def __repr__(self) -> str:
        return f"HeadLoss({self.task}, {self.head.problem})"


# ---------------------------------------------------------------------------- attention

def _sdpa_kwargs(args: tuple, kwargs: dict, index: int) -> dict:
    """An SDPA call's arguments by name (the schema's positional order; what
    ``normalize_function`` gives, at a fraction of its cost per attention call)."""
    if len(args) > len(_SDPA_ARGS) or any(k in _SDPA_ARGS[: len(args)] for k in kwargs) \
            or any(k not in _SDPA_ARGS for k in kwargs):
        norm = normalize_function(SDPA, args, kwargs, normalize_to_only_use_kwargs=True)
        if norm is None:
            raise MuxcInternalError(f"cannot normalise attention arguments of node {index}")
        return dict(norm.kwargs)
    kw = dict(zip(_SDPA_ARGS, args))
    kw.update(kwargs)
    return kw


@dataclass(frozen=True)
class ChunkAttention:
    """Attention node ``index`` of the backbone (one per layer), called as
    ``(mux, *sdpa_args, **sdpa_kwargs)``.

    Without a chunk step in ``mux`` it is exactly the original SDPA call. In a chunk step it
    prepends the K/V its stream's earlier chunks left in ``mux.kv`` (gathered to this step's
    rows), stores the result for the next chunk, and attends under the step's document mask
    (each token sees only earlier tokens of its own sample). ``mux.kv[index]`` holds
    ``(K, V)``; how gradients cross chunks is the runtime's business (it may replace the stored
    tensors by detached leaves between steps).

    ``alibi`` (per-head slopes, from an ALiBi model's rewritten attention) makes a chunk step
    add ALiBi's bias ``slope_h * key position`` (positions within the sample, over the kept
    columns too) under the document mask, as the model adds it within a row.
    """

    index: int
    alibi: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", f"chunk_attention_{self.index}")

    def __call__(self, mux: MuxBatch, *args, **kwargs) -> torch.Tensor:
        step = mux.chunk
        if step is None:
            return SDPA(*args, **kwargs)
        kw = _sdpa_kwargs(args, kwargs, self.index)
        q, k, v = kw.pop("query"), kw.pop("key"), kw.pop("value")
        kw.pop("attn_mask", None)
        kw["is_causal"] = False
        if step.index > 0:
            past = mux.kv.get(self.index)
            if past is None:
                raise MuxcInternalError(f"attention {self.index}: no kept K/V for chunk {step.index}")
            pk, pv = past
            k = torch.cat([pk.index_select(0, step.gather), k], dim=-2)
            v = torch.cat([pv.index_select(0, step.gather), v], dim=-2)
        mux.kv[self.index] = (k, v)
        mask = step.mask
        if self.alibi is not None:
            slopes = torch.tensor(self.alibi, dtype=torch.float32, device=q.device)
            bias = slopes[None, :, None, None] * step.key_positions[:, None, None, :].float()
            mask = torch.where(mask, bias.to(q.dtype), float("-inf"))
        return SDPA(q, k, v, attn_mask=mask, **kw)

    def __repr__(self) -> str:
        return f"ChunkAttention({self.index}{', alibi' if self.alibi is not None else ''})"
