"""Checking user batches and laying a group's batches out as one `MuxBatch` (pad alignment).

Each task's rows are stacked task after task and right-padded (``attention_mask`` 0, labels
-100) to a common sequence length, so every task's tokens form one contiguous segment of the
flattened ``(rows * seq, hidden)`` activations. Right padding changes no real token's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from muxc.errors import BatchError
from muxc.ir import IGNORE_INDEX, HeadInfo, MuxBatch
from muxc.kernels.registry import Impl

__all__ = [
    "BatchSpec", "check_batches", "unlabeled", "build_batch", "pooled_positions", "with_virtual_tokens",
]

_KEYS = {"input_ids", "attention_mask", "labels"}
# torch's embedding also takes int32 ids, but the exported graphs are specialised to int64
_ID_DTYPES = (torch.int64,)
_LABEL_DTYPES = (torch.int64,)  # what cross-entropy takes with -100 in it


@dataclass(frozen=True)
class BatchSpec:
    """What batches a compiled program accepts, beyond structure and dtypes.

    vocab_size: rows of the base model's input embedding: ``input_ids`` lie in
      ``[0, vocab_size)``.
    label_classes: width of its LM head: ``labels`` lie in ``[0, label_classes)`` or are -100.
    right_padded: every row's real tokens come first and padding carries no labels (needed by
      ``alignment="chunk"``, which packs each row's real tokens).
    """

    vocab_size: int
    label_classes: int
    right_padded: bool = False
    heads: Mapping = field(default_factory=dict)  # task -> HeadInfo of tasks with their own head
    # task -> virtual tokens put in front of each of its rows (prompt tuning, `with_virtual_tokens`)
    virtual: Mapping = field(default_factory=dict)


def check_batches(
    batches: Mapping[str, Mapping], tasks: tuple[str, ...], spec: BatchSpec | None = None
) -> None:
    """Raise `BatchError` for anything in any batch that the tasks alone could not train on.

    Checked for every task before any computation: known task names; keys; 2-D non-empty
    ``input_ids`` with ``labels``/``attention_mask`` of its shape; int64 ``input_ids`` and
    ``labels`` (not bool, float or int32); ``attention_mask`` values 0 or 1; with
    ``spec``, ids and labels in its ranges and, if it asks, right padding. The message names
    the task, the field and the first offending value with its ``[row, col]``.
    """
    if not isinstance(batches, Mapping) or not batches:
        raise BatchError(
            f"batches must be a non-empty dict task name -> batch; got {type(batches).__name__}"
        )
    unknown = sorted(set(batches) - set(tasks))
    if unknown:
        raise BatchError(f"batch for unknown task(s) {unknown}; compiled tasks are {list(tasks)}")
    for name, b in batches.items():
        if not isinstance(b, Mapping):
            raise BatchError(f"task {name!r}: batch must be a dict, got {type(b).__name__}")
        keys = set(b)
        if "labels" not in keys:
            raise BatchError(
                f"task {name!r}: batch has no 'labels' (keys: {sorted(keys)}); pass labels "
                "(usually a copy of input_ids with -100 on padding) so the task has a loss"
            )
        if "input_ids" not in keys:
            raise BatchError(f"task {name!r}: batch has no 'input_ids' (keys: {sorted(keys)})")
        extra = sorted(keys - _KEYS)
        if extra:
            raise BatchError(
                f"task {name!r}: unsupported batch key(s) {extra}; muxc takes {sorted(_KEYS)}"
            )
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            raise BatchError(
                f"task {name!r}: input_ids must be a non-empty 2-D (batch, seq) tensor, got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        head = _seq_cls(spec, name)
        if head is not None:
            _check_cls_labels(name, b["labels"], ids, head)
        for k in ("attention_mask",) if head is not None else ("attention_mask", "labels"):
            if k in b and (not isinstance(b[k], torch.Tensor) or b[k].shape != ids.shape):
                raise BatchError(
                    f"task {name!r}: {k} must be a tensor shaped like input_ids "
                    f"{tuple(ids.shape)}, got {getattr(b[k], 'shape', type(b[k]).__name__)}"
                )
        _check_dtype(name, "input_ids", ids, _ID_DTYPES)
        if head is None:
            _check_dtype(name, "labels", b["labels"], _LABEL_DTYPES)
    for name, b in batches.items():  # values only once every batch's structure is known good
        _check_values(name, b, spec)


def _seq_cls(spec: BatchSpec | None, task: str) -> HeadInfo | None:
    head = None if spec is None else spec.heads.get(task)
    return head if head is not None and head.problem == "seq_cls" else None


def _check_cls_labels(task: str, labels, ids: torch.Tensor, head: HeadInfo) -> None:
    """A sequence-classification batch: one label per row, typed for HF's problem type."""
    rows = ids.shape[0]
    if not isinstance(labels, torch.Tensor):
        raise BatchError(f"task {task!r}: labels must be a tensor, got {type(labels).__name__}")
    if head.pad_token_id is None and rows != 1:
        raise BatchError(
            f"task {task!r}: the model config has no pad_token_id, so HF cannot find each row's "
            f"last token in a batch of {rows} rows; set model.config.pad_token_id or use 1 row"
        )
    kind = head.resolved_problem_type(labels)
    if kind == "single_label_classification":
        if labels.dtype not in _LABEL_DTYPES or tuple(labels.shape) not in ((rows,), (rows, 1)):
            raise BatchError(
                f"task {task!r}: single-label classification labels must be int64 class ids "
                f"shaped ({rows},), got {labels.dtype} {tuple(labels.shape)}"
            )
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= head.num_labels))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise BatchError(
                f"task {task!r}: label {labels.reshape(-1)[i].item()} at [{i}] is not a class id in "
                f"[0, {head.num_labels}) (or {IGNORE_INDEX}, ignored)"
            )
        return
    want = (rows,) if head.num_labels == 1 else (rows, head.num_labels)
    if not labels.dtype.is_floating_point or tuple(labels.shape) not in (want, (rows, head.num_labels)):
        what = "regression" if kind == "regression" else "multi-label"
        raise BatchError(
            f"task {task!r}: {what} labels must be floating point shaped {want}, got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(labels).all()):
        raise BatchError(f"task {task!r}: labels hold non-finite values")


def _check_dtype(task: str, key: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype in allowed:
        return
    names = "/".join(str(d).removeprefix("torch.") for d in allowed)
    if t.dtype == torch.bool:
        why = "a bool tensor is a mask, not token ids"
    else:
        why = "token ids are integers" if t.dtype.is_floating_point else ""
    raise BatchError(
        f"task {task!r}: {key} has dtype {t.dtype}, expected {names}"
        f"{f' ({why})' if why else ''}; convert with {key}.long()"
    )


def _check_values(task: str, b: Mapping, spec: BatchSpec | None) -> None:
    ids, labels, mask = b["input_ids"], b["labels"], b.get("attention_mask")
    if mask is not None:
        if mask.dtype.is_complex:
            raise BatchError(f"task {task!r}: attention_mask has dtype {mask.dtype}; use 0/1 ints")
        if mask.dtype != torch.bool:
            _refuse(task, "attention_mask", mask, (mask != 0) & (mask != 1), "is not 0 or 1")
    if spec is None:
        return
    _refuse(task, "input_ids", ids, (ids < 0) | (ids >= spec.vocab_size),
            f"is outside the vocabulary [0, {spec.vocab_size}) of the compiled model")
    if _seq_cls(spec, task) is not None:
        return
    _refuse(task, "labels", labels,
            (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= spec.label_classes)),
            f"is neither {IGNORE_INDEX} (ignored) nor a token id in [0, {spec.label_classes})")
    if spec.right_padded and mask is not None:
        _check_right_padded(task, mask.to(device=ids.device, dtype=torch.bool), labels)


def _check_right_padded(task: str, mask: torch.Tensor, labels: torch.Tensor) -> None:
    real = torch.arange(mask.shape[1], device=mask.device) < mask.sum(1, keepdim=True)
    rows = (mask != real).any(1)
    if bool(rows.any()):
        r = int(rows.nonzero()[0])
        raise BatchError(
            f"task {task!r}: attention_mask row {r} is not right-padded "
            f"({mask[r].int().tolist()}); alignment='chunk' packs samples and needs right "
            "padding (padding_side='right')"
        )
    _refuse(task, "labels", labels, ~real & (labels.to(real.device) != IGNORE_INDEX),
            "is on padding (attention_mask 0); set labels to -100 there (alignment='chunk' "
            "drops padding)")


def _refuse(task: str, key: str, t: torch.Tensor, bad: torch.Tensor, what: str) -> None:
    if not bool(bad.any()):
        return
    row, col = bad.nonzero()[0].tolist()
    count = int(bad.sum())
    raise BatchError(
        f"task {task!r}: {key} value {t[row, col].item()} at [{row}, {col}] {what}"
        f"{f' ({count} such values)' if count > 1 else ''}"
    )


def unlabeled(batches: Mapping[str, Mapping], heads: Mapping | None = None) -> list[str]:
    """Tasks whose batch has no label token after the causal shift (HF predicts position
    ``i`` from ``i - 1``, so a label at position 0 trains nothing): their loss would be NaN."""
    heads = heads or {}
    out = []
    for n, b in batches.items():
        head = heads.get(n)
        if head is not None and head.problem == "seq_cls":  # one label per row
            if head.label_count(b["labels"]) == 0:
                out.append(n)
        elif not bool((b["labels"][:, 1:] != IGNORE_INDEX).any()):
            out.append(n)
    return out


def pooled_positions(ids: torch.Tensor, head: HeadInfo) -> torch.Tensor:
    """Each row's last non-padding token, as HF's sequence classifiers pick it
    (`HeadInfo.pooled_positions`)."""
    return head.pooled_positions(ids)


def build_batch(
    batches: Mapping[str, Mapping],
    order: tuple[str, ...],
    device: torch.device,
    impl: Impl | None,
    training: bool = True,
    heads: Mapping | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MuxBatch]:
    """Stack the batches of the tasks in ``order`` (skipping absent ones) into one batch.

    A sequence-classification task (in ``heads``) keeps its per-row labels, and its pooled
    positions are taken from its own ids before any padding (`MuxBatch.pooled`)."""
    heads = heads or {}
    names = tuple(t for t in order if t in batches)
    seq = max(batches[t]["input_ids"].shape[1] for t in names)
    ids, masks, labels, rows, pooled = [], [], [], [], []
    for t in names:
        b = batches[t]
        x = b["input_ids"].to(device)
        m = b.get("attention_mask")
        m = torch.ones_like(x) if m is None else m.to(device=device, dtype=x.dtype)
        y = b["labels"].to(device)
        head = heads.get(t)
        cls = head is not None and head.problem == "seq_cls"
        pooled.append(pooled_positions(x, head) if cls else None)
        pad = seq - x.shape[1]
        if pad:
            x = torch.nn.functional.pad(x, (0, pad), value=0)
            m = torch.nn.functional.pad(m, (0, pad), value=0)
            if not cls:
                y = torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)
        ids.append(x)
        masks.append(m)
        labels.append(y)
        rows.append(x.shape[0])
    mux = MuxBatch(
        tasks=names, rows=tuple(rows), seq_len=seq, labels=tuple(labels), impl=impl, training=training,
        pooled=tuple(pooled) if any(p is not None for p in pooled) else None,
    )
    return torch.cat(ids), torch.cat(masks), mux


def with_virtual_tokens(batches: Mapping[str, Mapping], virtual: Mapping[str, int]) -> dict:
    """``batches`` with ``virtual[task]`` placeholder tokens in front of each row of each such
    task (id 0, ``attention_mask`` 1, label -100), as PEFT prepends a prompt-learning task's
    virtual tokens (`muxc.kinds.prompt` replaces their embeddings); other batches as they are.

    >>> b = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 6]])}
    >>> {k: v.tolist() for k, v in with_virtual_tokens({"t": b}, {"t": 2})["t"].items()}
    {'input_ids': [[0, 0, 5, 6]], 'labels': [[-100, -100, 5, 6]]}
    """
    out = {}
    for name, b in batches.items():
        n = virtual.get(name, 0)
        if not n:
            out[name] = b
            continue
        ids = b["input_ids"]
        new = dict(b)
        new["input_ids"] = torch.cat([ids.new_zeros(ids.shape[0], n), ids], 1)
        labels = b["labels"]
        new["labels"] = torch.cat([labels.new_full((ids.shape[0], n), IGNORE_INDEX), labels], 1)
        mask = b.get("attention_mask")
        if mask is not None:
            new["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)
        out[name] = new
    return out
