"""Checking user batches and laying a group's batches out as one `MuxBatch` (pad alignment).

Each task's rows are stacked task after task and right-padded (``attention_mask`` 0, labels
-100) to a common sequence length, so every task's tokens form one contiguous segment of the
flattened ``(rows * seq, hidden)`` activations. Right padding changes no real token's result.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from muxc.errors import BatchError
from muxc.ir import IGNORE_INDEX, MuxBatch
from muxc.kernels.registry import Impl

__all__ = ["check_batches", "build_batch"]

_KEYS = {"input_ids", "attention_mask", "labels"}


def check_batches(batches: Mapping[str, Mapping], tasks: tuple[str, ...]) -> None:
    """Raise `BatchError` for unknown tasks, missing/extra keys or inconsistent shapes."""
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
