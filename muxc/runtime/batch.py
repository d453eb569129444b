"""Checking user batches and laying a group's batches out as one `MuxBatch` (pad alignment).

Each task's rows are stacked task after task and right-padded (``attention_mask`` 0, labels
-100) to a common sequence length, so every task's tokens form one contiguous segment of the
flattened ``(rows * seq, hidden)`` activations. Right padding changes no real token's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from muxc.errors import BatchError
from muxc.ir import IGNORE_INDEX, MuxBatch
from muxc.kernels.registry import Impl

__all__ = ["BatchSpec", "check_batches", "unlabeled", "build_batch"]

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
        for k in ("attention_mask", "labels"):
            if k in b and (not isinstance(b[k], torch.Tensor) or b[k].shape != ids.shape):
                raise BatchError(
                    f"task {name!r}: {k} must be a tensor shaped like input_ids "
                    f"{tuple(ids.shape)}, got {getattr(b[k], 'shape', type(b[k]).__name__)}"
                )
        _check_dtype(name, "input_ids", ids, _ID_DTYPES)
        _check_dtype(name, "labels", b["labels"], _LABEL_DTYPES)
    for name, b in batches.items():  # values only once every batch's structure is known good
        _check_values(name, b, spec)


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


def unlabeled(batches: Mapping[str, Mapping]) -> list[str]:
    """Tasks whose batch has no label token after the causal shift (HF predicts position
    ``i`` from ``i - 1``, so a label at position 0 trains nothing): their loss would be NaN."""
    return [n for n, b in batches.items() if not bool((b["labels"][:, 1:] != IGNORE_INDEX).any())]


def build_batch(
    batches: Mapping[str, Mapping],
    order: tuple[str, ...],
    device: torch.device,
    impl: Impl | None,
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, MuxBatch]:
    """Stack the batches of the tasks in ``order`` (skipping absent ones) into one batch."""
    names = tuple(t for t in order if t in batches)
    seq = max(batches[t]["input_ids"].shape[1] for t in names)
    ids, masks, labels, rows = [], [], [], []
    for t in names:
        b = batches[t]
        x = b["input_ids"].to(device)
        m = b.get("attention_mask")
        m = torch.ones_like(x) if m is None else m.to(device=device, dtype=x.dtype)
        y = b["labels"].to(device)
        pad = seq - x.shape[1]
        if pad:
            x = torch.nn.functional.pad(x, (0, pad), value=0)
            m = torch.nn.functional.pad(m, (0, pad), value=0)
            y = torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)
        ids.append(x)
        masks.append(m)
        labels.append(y)
        rows.append(x.shape[0])
    mux = MuxBatch(
        tasks=names, rows=tuple(rows), seq_len=seq, labels=tuple(labels), impl=impl, training=training
    )
    return torch.cat(ids), torch.cat(masks), mux
