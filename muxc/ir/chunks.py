"""Chunk-based data alignment: pack each task's samples into streams cut into equal chunks.

For one hTask and chunk size ``C``: each task's samples (real tokens only) are packed, whole,
into *streams* (first-fit, longest first, capacity = the longest sample rounded up to a
multiple of ``C``); no stream mixes tasks. Each stream is padded only up to its next multiple
of ``C``, then cut into chunks. Step ``c`` batches chunk ``c`` of every stream that has one,
task after task, so tasks share every kernel with no inter-task padding.

Exactness: positions restart at 0 for each sample; a token attends only to earlier tokens of
its own sample (document mask over the stream); a chunk attends to the K/V of its stream's
earlier chunks, which the runtime keeps (with autograd) until the stream completes; labels
are shifted within each sample exactly as HF shifts them within a row. A sequence-
classification task (``heads``) has no token labels: each sample's pooled token (HF's last
non-padding one) is found in the chunk step that holds it, and that step's `ChunkStep.pooled`
gives its (row, column) there and the sample's label, so the task's loss is summed over the
steps that hold its samples' last tokens (times 1 / the batch's label count: HF's mean).

>>> ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
>>> b = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": ids.masked_fill(ids == 0, -100)}
>>> lay = build_layout({"t": b}, ("t",), chunk_size=2, device=torch.device("cpu"))
>>> [s.ids.tolist() for s in lay.steps], lay.ineffective_fraction
([[[5, 6], [8, 9]], [[7, 0]]], 0.16666666666666663)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from muxc.errors import BatchError
from muxc.ir.ops import IGNORE_INDEX, HeadInfo

__all__ = ["Stream", "ChunkStep", "ChunkLayout", "build_layout", "stream_chunks"]


@dataclass(frozen=True)
class Stream:
    """One task's packed samples, padded to a multiple of the chunk size."""

    task: str
    ids: torch.Tensor  # (L,)
    positions: torch.Tensor  # (L,) restart at 0 per sample
    docs: torch.Tensor  # (L,) sample index; padding gets unique negative ids
    labels: torch.Tensor  # (L,) already shifted within each sample
    real: int
    # sequence classification: (batch row, offset in the stream of its pooled token) per sample
    heads: tuple[tuple[int, int], ...] = ()

    @property
    def chunks(self) -> int:
        return self.ids.numel()


@dataclass(frozen=True)
class ChunkStep:
    """Chunk ``index`` of every stream that has one, batched task after task."""

    index: int
    tasks: tuple[str, ...]
    rows: tuple[int, ...]  # active streams per task
    ids: torch.Tensor  # (B, C)
    positions: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (B, C), shifted
    mask: torch.Tensor  # (B, 1, C, (index + 1) * C) bool: may query i attend key j
    gather: torch.Tensor | None  # (B,) row of each stream in the previous step
    # (B, (index + 1) * C) position in its sample of every key column (ALiBi's bias reads it)
    key_positions: torch.Tensor | None = None
    # sequence-classification task -> ((k, 2) (row among the task's rows, column) of the pooled
    # tokens this step holds, (k, ...) those samples' labels)
    pooled: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkLayout:
    chunk_size: int
    steps: tuple[ChunkStep, ...]
    label_counts: dict[str, int]
    tokens_computed: int
    real_tokens: int
    streams: dict[str, int] = field(default_factory=dict)

    @property
    def ineffective_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.tokens_computed, 1)


def _samples(name: str, batch: Mapping, head: HeadInfo | None = None) -> list[tuple]:
    """(ids, shifted labels, batch row, pooled offset or -1) of each row's real tokens,
    checking right padding; ``head``: a sequence-classification task (no token labels: each
    row is one sample, pooled at its last token; causal-LM batches go to `_lm_samples`)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
    labels = batch["labels"]
    if head is None:
        return _lm_samples(name, ids, mask, labels)
    pooled = head.pooled_positions(ids)
    out = []
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        if not bool(mask[r, :n].all()):
            raise _not_right_padded(name, r, mask[r])
        p = int(pooled[r])
        if p >= n:
            raise BatchError(
                f"task {name!r}: row {r}'s last non-padding token (column {p}, the rightmost "
                f"id that is not pad_token_id) lies outside its {n} attended tokens; "
                "alignment='chunk' drops padding: give padding pad_token_id and "
                "attention_mask 0, or use alignment='pad'"
            )
        out.append((ids[r, :n], torch.full((n,), IGNORE_INDEX, dtype=torch.long), r, p))
    return out


def _not_right_padded(name: str, r: int, mask_row: torch.Tensor) -> BatchError:
    return BatchError(
        f"task {name!r}: row {r} is not right-padded (attention_mask {mask_row.tolist()}); "
        "alignment='chunk' packs samples and needs right padding (padding_side='right')"
    )


def _lm_samples(name: str, ids: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor) -> list[tuple]:
    """`_samples` of a causal-LM batch: the checks and the label shift done for all rows at
    once (a few tensor ops per batch, not per row), the rows then sliced."""
    lengths = mask.sum(1)
    after = torch.arange(ids.shape[1], device=ids.device)[None, :] >= lengths[:, None]
    holes = ((mask == 0) & ~after).any(1)  # a 0 among a row's first n: not right-padded
    padded_labels = ((labels != IGNORE_INDEX) & after.to(labels.device)).any(1).to(ids.device)
    bad = (holes | padded_labels) & (lengths > 0)  # rows without tokens are skipped unchecked
    for r in torch.nonzero(bad).flatten().tolist()[:1]:  # the first bad row, as a loop finds it
        if holes[r]:
            raise _not_right_padded(name, r, mask[r])
        raise BatchError(
            f"task {name!r}: row {r} has labels on padding; set labels to -100 where "
            "attention_mask is 0 (alignment='chunk' drops padding)"
        )
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return [(ids[r, :n], shifted[r, :n], r, -1)
            for r, n in enumerate(int(n) for n in lengths.tolist()) if n > 0]


def _bins(lengths: list[int], chunk: int) -> list[list[int]]:
    """Sample indices per stream: first-fit, longest first, capacity = the longest sample
    rounded up to a multiple of ``chunk``."""
    capacity = -(-max(max(lengths), chunk) // chunk) * chunk
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for b, used in enumerate(fill):
            if used + n <= capacity:
                bins[b].append(i)
                fill[b] += n
                break
        else:
            bins.append([i])
            fill.append(n)
    return bins


def stream_chunks(lengths: list[int] | tuple[int, ...], chunk: int) -> tuple[int, ...]:
    """Chunks per stream (longest first) of one task whose samples have ``lengths`` real
    tokens, packed as `build_layout` packs them; no tensors, for the planner. Memoised: the
    fusion DP asks for each task's packing at each candidate chunk size once per group the
    task is in (~230 calls per 8-task plan for ~50 distinct answers).

    >>> stream_chunks([50, 49, 60, 54], 64), stream_chunks([50, 49, 60, 54], 60)
    ((1, 1, 1, 1), (1, 1, 1, 1))
    >>> stream_chunks([23, 59, 11, 37], 59), stream_chunks([162, 196, 231, 90], 32)
    ((1, 1, 1), (8, 8, 7))
    """
    return _stream_chunks(tuple(lengths), chunk)


@lru_cache(maxsize=4096)
def _stream_chunks(lengths: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    real = [n for n in lengths if n > 0]
    if not real:
        return ()
    return tuple(sorted((-(-sum(real[i] for i in b) // chunk) for b in _bins(real, chunk)),
                        reverse=True))


def _pack(name: str, samples, chunk: int) -> list[Stream]:
    if not samples:
        return []
    bins = _bins([s[0].numel() for s in samples], chunk)
    streams = []
    for members in bins:
        ids = torch.cat([samples[i][0] for i in members])
        labels = torch.cat([samples[i][1] for i in members])
        pos = torch.cat([torch.arange(samples[i][0].numel()) for i in members])
        docs = torch.cat([torch.full((samples[i][0].numel(),), k) for k, i in enumerate(members)])
        starts = torch.tensor([0] + [samples[i][0].numel() for i in members]).cumsum(0).tolist()
        heads = tuple((samples[i][2], starts[k] + samples[i][3])
                      for k, i in enumerate(members) if samples[i][3] >= 0)
        real = ids.numel()
        pad = -real % chunk
        if pad:
            ids = torch.nn.functional.pad(ids, (0, pad), value=0)
            labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
            pos = torch.cat([pos, torch.arange(pad)])
            docs = torch.cat([docs, -1 - torch.arange(real, real + pad)])
        streams.append(Stream(name, ids, pos, docs, labels, real, heads))
    return streams


def build_layout(
    batches: Mapping[str, Mapping], order: tuple[str, ...], chunk_size: int, device: torch.device,
    heads: Mapping[str, HeadInfo] | None = None,
) -> ChunkLayout:
    """Lay out the batches of the tasks in ``order`` (absent ones skipped) as chunk steps;
    ``heads``: the tasks' heads (sequence-classification ones are pooled per sample)."""
    C = chunk_size
    per_task = {}
    counts = {}
    cls = {t: h for t, h in (heads or {}).items() if h.problem == "seq_cls"}
    for t in order:
        if t not in batches:
            continue
        samples = _samples(t, batches[t], cls.get(t))
        streams = sorted(_pack(t, samples, C), key=lambda s: -s.chunks)
        per_task[t] = streams
        if t in cls:
            counts[t] = cls[t].label_count(batches[t]["labels"])
        else:
            counts[t] = int(sum(int((s[1] != IGNORE_INDEX).sum()) for s in samples))
    n_steps = max((s.chunks // C for ss in per_task.values() for s in ss), default=0)
    steps = []
    prev_rows: dict[str, int] = {}
    for c in range(n_steps):
        tasks, rows, picked, gather, pooled = [], [], [], [], {}
        offset_prev = 0
        for t, streams in per_task.items():
            active = [s for s in streams if s.chunks > c * C]
            if active:
                tasks.append(t)
                rows.append(len(active))
                picked += active
                gather += [offset_prev + k for k in range(len(active))]
                if t in cls:
                    here = [(k, off - c * C, r) for k, s in enumerate(active) for r, off in s.heads
                            if c * C <= off < (c + 1) * C]
                    at = torch.tensor([h[:2] for h in here], dtype=torch.long).reshape(-1, 2)
                    which = torch.tensor([h[2] for h in here], dtype=torch.long)
                    labels = batches[t]["labels"]
                    pooled[t] = (at.to(device), labels[which.to(labels.device)].to(device))
            offset_prev += prev_rows.get(t, 0)
        prev_rows = dict(zip(tasks, rows))
        sl = slice(c * C, (c + 1) * C)
        docs_k = torch.stack([s.docs[: (c + 1) * C] for s in picked])
        docs_q = docs_k[:, c * C :]
        spos = torch.arange((c + 1) * C)
        mask = (docs_q[:, :, None] == docs_k[:, None, :]) & (spos[None, None, :] <= spos[c * C :][None, :, None])
        steps.append(
            ChunkStep(
                index=c,
                tasks=tuple(tasks),
                rows=tuple(rows),
                ids=torch.stack([s.ids[sl] for s in picked]).to(device),
                positions=torch.stack([s.positions[sl] for s in picked]).to(device),
                labels=torch.stack([s.labels[sl] for s in picked]).to(device),
                mask=mask[:, None].to(device),
                gather=None if c == 0 else torch.tensor(gather, device=device),
                key_positions=torch.stack([s.positions[: (c + 1) * C] for s in picked]).to(device),
                pooled=pooled,
            )
        )
    streams_all = [s for ss in per_task.values() for s in ss]
    return ChunkLayout(
        chunk_size=C,
        steps=tuple(steps),
        label_counts=counts,
        tokens_computed=sum(s.chunks for s in streams_all),
        real_tokens=sum(s.real for s in streams_all),
        streams={t: len(ss) for t, ss in per_task.items()},
    )
