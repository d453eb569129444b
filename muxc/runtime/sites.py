"""Callables the merged graph runs at adapter sites and per-task losses.

A *site* serves every task's adapter at one base op: it lays out the active tasks' adapters
in the step's segment order (a task without an adapter here gets a rank-0 LoRA / a ones IA3
vector, so its tokens pass through unchanged) and makes ONE multi-task kernel call per adapter
kind, whatever the number of tasks. Instances are immutable graph targets; all per-step facts
come from the `MuxBatch` input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muxc.errors import MuxcInternalError, UnsupportedPeftError
from muxc.ir import AdapterKind, AdapterRecord, Position
from muxc.kernels import multi_ia3, multi_lora
from muxc.runtime.batch import IGNORE_INDEX, MuxBatch

__all__ = ["OutputSite", "InputSite", "TaskLoss", "causal_lm_loss"]


def _flat(t: torch.Tensor, mux: MuxBatch, what: str) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[0] != mux.tokens():
        raise MuxcInternalError(
            f"{what}: {tuple(t.shape)} does not flatten to the step's {mux.tokens()} tokens"
        )
    return flat


def _common_dtype(records: tuple[AdapterRecord, ...], site: str) -> torch.dtype | None:
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
    records: tuple[AdapterRecord, ...]  # graph args after (x[, h], mux) are these records' params

    def __post_init__(self) -> None:
        _common_dtype(self.records, self.site)
        # fx code generation names a call_function target by __name__
        object.__setattr__(self, "__name__", f"{type(self).__name__}_{self.site.replace('.', '_')}")

    def _params(self, flat_params) -> dict[str, dict[str, torch.Tensor]]:
        out, i = {}, 0
        for r in self.records:
            n = len(r.params)
            out[r.task] = dict(zip(r.params, flat_params[i : i + n]))
            i += n
        if i != len(flat_params):
            raise MuxcInternalError(f"site {self.site!r}: expected {i} params, got {len(flat_params)}")
        return out

    def _by_kind(self, kind: AdapterKind) -> dict[str, AdapterRecord]:
        return {r.task: r for r in self.records if r.kind is kind}

    def _ia3(self, t: torch.Tensor, mux: MuxBatch, params, recs) -> torch.Tensor:
        if not any(task in recs for task in mux.tasks):
            return t
        flat = _flat(t, mux, f"site {self.site}")
        dtype = _common_dtype(tuple(recs.values()), self.site)
        ones = None
        vectors = []
        for task in mux.tasks:
            if task in recs:
                vectors.append(params[task]["v"].reshape(-1))
            else:
                if ones is None:
                    ones = torch.ones(flat.shape[1], dtype=dtype, device=flat.device)
                vectors.append(ones)
        z = multi_ia3(flat.to(dtype), mux.seg_lens, vectors, impl=mux.impl)
        return z.to(t.dtype).view(t.shape)

    def __repr__(self) -> str:
        kinds = ",".join(f"{r.task}:{r.kind.value}" for r in self.records)
        return f"{type(self).__name__}({self.site}; {kinds})"


class OutputSite(_Site):
    """After a base op: ``h + s*B(A(x))`` for LoRA tasks, ``h * v`` for IA3 tasks."""

    def __call__(self, x: torch.Tensor, h: torch.Tensor, mux: MuxBatch, *flat_params) -> torch.Tensor:
        params = self._params(flat_params)
        out = h
        loras = self._by_kind(AdapterKind.LORA)
        if any(task in loras for task in mux.tasks):
            out = out + self._lora(x, mux, params, loras).view(h.shape).to(h.dtype)
        return self._ia3(out, mux, params, self._by_kind(AdapterKind.IA3))

    def _lora(self, x, mux: MuxBatch, params, recs) -> torch.Tensor:
        flat = _flat(x, mux, f"site {self.site}")
        dtype = _common_dtype(tuple(recs.values()), self.site)
        flat = flat.to(dtype)
        n_out = next(iter(recs.values())).params["B"].shape[0]
        a_list, b_list, scaling, drops = [], [], [], []
        for task in mux.tasks:
            if task in recs:
                a_list.append(params[task]["A"])
                b_list.append(params[task]["B"])
                scaling.append(recs[task].scaling)
                drops.append(recs[task].dropout)
            else:
                a_list.append(flat.new_empty(0, flat.shape[1]))
                b_list.append(flat.new_empty(n_out, 0))
                scaling.append(0.0)
                drops.append(0.0)
        if mux.training and any(p > 0 for p in drops):
            flat = _segment_dropout(flat, mux.seg_lens, drops)
        return multi_lora(flat, mux.seg_lens, a_list, b_list, scaling, impl=mux.impl)


class InputSite(_Site):
    """Before a base op: ``x * v`` for IA3 feed-forward tasks (the base op then reads it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(r.position is not Position.IN for r in self.records):
            raise MuxcInternalError(f"InputSite {self.site!r} given an output-side adapter")

    def __call__(self, x: torch.Tensor, mux: MuxBatch, *flat_params) -> torch.Tensor:
        params = self._params(flat_params)
        return self._ia3(x, mux, params, self._by_kind(AdapterKind.IA3))


def _segment_dropout(flat: torch.Tensor, seg_lens, probs) -> torch.Tensor:
    """Dropout with probability ``probs[i]`` on segment ``i`` (PEFT's lora_dropout)."""
    if len(set(probs)) == 1:
        return F.dropout(flat, probs[0], training=True)
    parts = torch.split(flat, list(seg_lens))
    return torch.cat([F.dropout(p, q, training=True) if q > 0 else p for p, q in zip(parts, probs)])


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
class TaskLoss:
    """One task's loss on its own rows of the shared logits (None when the task is inactive)."""

    task: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", f"loss_{self.task}")

    def __call__(self, logits: torch.Tensor, mux: MuxBatch) -> torch.Tensor | None:
        rng = mux.row_range(self.task)
        if rng is None:
            return None
        start, end = rng
        i = mux.tasks.index(self.task)
        if not mux.shifted:
            return causal_lm_loss(logits[start:end], mux.labels[i])
        part = logits[start:end]
        total = F.cross_entropy(
            part.float().reshape(-1, part.shape[-1]),
            mux.labels[i].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total * mux.loss_scale[i]  # this chunk's share of the task's mean loss

    def __repr__(self) -> str:
        return f"TaskLoss({self.task})"
