"""What every Triton kernel family shares: guarded import, checker, metadata tables, tuner.

``import muxc`` must work without triton: this module imports it inside ``try`` and, when it
fails, exposes a stand-in ``tl`` and a ``jit`` that leaves functions undecorated (they are never
launched: the families register their Triton implementations only when `AVAILABLE`).

Metadata. A multi-adapter kernel needs, per segment, its rows and its adapter. Both live in
one small int64 *segment table* on the device (one row per task; fields `F_*`), whose pointer
columns hold raw ``data_ptr()`` values of each task's tensors, loaded in-kernel and cast to
pointers: every task keeps its own tensor (no concatenation, no copy, no padding to a common
rank) and one launch reaches all of them. Tables depend only on their key (segment lengths,
ranks, pointers), so they are cached and, in steady state, every layer of every step hits.
Row tiles (which segment each ``BLOCK_M`` rows belong to) depend only on the segments and are
cached on the `Segments` object, i.e. built once per step and reused by every layer.

>>> from muxc.kernels import _triton
>>> _triton.AVAILABLE
True
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from muxc.kernels.segments import Segments

try:  # guarded: muxc works without triton (the torch reference is always registered)
    import triton
    import triton.language as tl

    AVAILABLE = True
    UNAVAILABLE_REASON: str | None = None
    jit = triton.jit
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not importable ({type(exc).__name__}: {exc})"

    class _MissingTl:
        """Stand-in so kernel bodies (never run without triton) still import."""

        constexpr = object

        def __getattr__(self, name):
            raise RuntimeError(UNAVAILABLE_REASON)

    tl = _MissingTl()

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "jit",
    "tl",
    "Config",
    "TUNER",
    "check",
    "interpreting",
    "launches",
    "count_launch",
    "segment_table",
    "row_tiles",
    "float_table",
    "next_pow2",
    "ragged_size",
    "clear_tables",
    "seg_meta",
    "seg_ptr",
    "triton",
    "F_START",
    "F_LEN",
    "F_RANK",
    "F_UOFF",
    "F_PTR",
    "N_FIELDS",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Segment-table fields (int64 columns). Pointer columns start at F_PTR.
F_START, F_LEN, F_RANK, F_UOFF, F_PTR = 0, 1, 2, 3, 4
N_FIELDS = 8
"""Row width of a segment table: start, len, rank, ragged-intermediate offset, 4 pointers."""


# ----------------------------------------------------------------------------- interpreter

if AVAILABLE:

    @triton.jit
    def _probe_kernel(x_ptr):
        tl.store(x_ptr, 1)


def interpreting() -> bool:
    """True when ``@triton.jit`` produced interpreter functions (``TRITON_INTERPRET=1`` was set
    before triton was imported); then kernels run on CPU tensors through numpy."""
    if not AVAILABLE:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


def check(*tensors: torch.Tensor, forced: bool) -> str | None:
    """Registry checker shared by every Triton implementation: None when it can run."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    t = tensors[0]
    if t.dtype not in SUPPORTED_DTYPES:
        return (
            f"dtype {t.dtype} is not supported by the triton kernels (float32, float16, "
            "bfloat16); cast the activations or use impl='torch'"
        )
    if t.device.type == "cuda":
        if interpreting():
            return (
                "the triton interpreter is active (TRITON_INTERPRET=1) but tensors are on cuda; "
                "unset TRITON_INTERPRET to run the compiled kernels"
            )
        return None
    if t.device.type == "cpu":
        if not forced:
            return (
                'tensors are on cpu; triton is used on cuda only (force impl="triton" to run '
                "the interpreter)"
            )
        if not interpreting():
            return (
                "tensors are on cpu and the triton interpreter is off; set TRITON_INTERPRET=1 "
                "before importing muxc to run the kernels on cpu"
            )
        return None
    return f"tensors are on {t.device.type}; the triton kernels run on cuda (or cpu interpreted)"


# ----------------------------------------------------------------------------- jit helpers


@jit
def seg_meta(tab_ptr, seg):
    """(start, len, rank, ragged offset) of segment ``seg`` from a segment table."""
    row = tab_ptr + seg.to(tl.int64) * 8  # N_FIELDS
    return tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@jit
def seg_ptr(tab_ptr, seg, FIELD: tl.constexpr, like_ptr):
    """Pointer column ``FIELD`` of segment ``seg``, typed like ``like_ptr``."""
    raw = tl.load(tab_ptr + seg.to(tl.int64) * 8 + FIELD)
    return raw.to(tl.pointer_type(like_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- launch counter

_LAUNCHES: Counter = Counter()


def count_launch(kernel: str) -> None:
    """Record one launch of ``kernel`` (called by launchers, never by tuning runs)."""
    _LAUNCHES[kernel] += 1


def launches() -> dict[str, int]:
    """A snapshot of launches per kernel since import: tests diff two snapshots to prove the
    Triton path ran (read-only observation; nothing resets it)."""
    return dict(_LAUNCHES)


# ----------------------------------------------------------------------------- metadata


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class _Lru:
    """A tiny LRU map for device tables whose content is a pure function of the key."""

    def __init__(self, size: int) -> None:
        self.size, self.data = size, OrderedDict()

    def get(self, key, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        hit = self.data.get(key)
        if hit is not None:
            self.data.move_to_end(key)
            return hit
        value = build()
        self.data[key] = value
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value


# Sized for a few hundred adapted layers x forward/backward tables per step.
_TABLES = _Lru(4096)


def _to_device(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=dtype)
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


def segment_table(
    segs: Segments,
    ranks: Sequence[int],
    pointers: Sequence[Sequence[torch.Tensor | None]],
    device: torch.device,
) -> torch.Tensor:
    """The ``(tasks, N_FIELDS)`` int64 table: start, len, rank, offset of the segment's rows
    in the ragged ``(sum len_i*r_i)`` intermediate, then up to 4 pointer columns (one list of
    per-task tensors each; None -> 0)."""
    if len(pointers) > N_FIELDS - F_PTR:
        raise ValueError(f"at most {N_FIELDS - F_PTR} pointer columns, got {len(pointers)}")
    ptrs = tuple(tuple(0 if t is None else t.data_ptr() for t in col) for col in pointers)
    key = ("seg", segs.lens, tuple(ranks), ptrs, str(device))

    def build():
        rows, u_off = [], 0
        for i, start, end in segs.bounds():
            row = [start, end - start, ranks[i], u_off] + [col[i] for col in ptrs]
            rows.append(row + [0] * (N_FIELDS - len(row)))
            u_off += (end - start) * ranks[i]
        return _to_device(rows, torch.int64, device)

    return _TABLES.get(key, build)


def clear_tables() -> None:
    """Drop every cached segment/float table (to time building the metadata from scratch)."""
    _TABLES.data.clear()


def ragged_size(segs: Segments, ranks: Sequence[int]) -> int:
    """Elements of the ragged intermediate: row t of segment i holds exactly r_i values."""
    return sum(n * r for n, r in zip(segs.lens, ranks))


def float_table(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-task float32 scalars (LoRA scaling) on ``device``, cached by value."""
    key = ("f32", tuple(float(v) for v in values), str(device))
    return _TABLES.get(key, lambda: _to_device(list(key[1]), torch.float32, device))


def row_tiles(segs: Segments, block_m: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """``(tiles, n)``: int32 ``(n, 2)`` = (segment, first row) of every ``block_m``-row tile that
    stays inside one segment (empty segments get none). Cached on ``segs`` (once per step)."""

    def build():
        rows = [
            [i, r] for i, start, end in segs.bounds() for r in range(start, end, block_m)
        ]
        return (_to_device(rows or [[0, 0]], torch.int32, device), len(rows))

    return segs.cached(("row_tiles", block_m, str(device)), build)


# ----------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class Config:
    """Block sizes of one launch. ``block_m`` tiles tokens, ``block_n`` the feature axis the
    kernel walks (K for shrink, N for expand, the reduced-into columns for gradients),
    ``block_r`` the rank axis; warps/stages are Triton's."""

    block_m: int
    block_n: int
    block_r: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def fit(self, n: int, r: int) -> Config:
        """Shrink blocks that exceed the problem (masking covers the rest; >= 16 for tl.dot)."""
        return Config(
            block_m=self.block_m,
            block_n=max(16, min(self.block_n, next_pow2(n))),
            block_r=max(16, min(self.block_r, next_pow2(r))),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


@dataclass
class Tuner:
    """Picks a `Config` per key by timing the candidates once on the device.

    Key: (op, tasks, tokens rounded up to a power of two, K, N, max rank, dtype, device name).
    On CUDA a miss times every candidate with ``triton.testing.do_bench`` on the real inputs
    (launch functions passed to `pick` must be idempotent) and keeps the fastest. Problems
    streaming fewer than ``min_work`` elements (2^20 = 2 MB of fp16) take the first candidate
    untimed: such a launch costs a few microseconds whatever its blocks, less than timing the
    candidates would. In the interpreter the given default is used, untimed. `report()` lists
    what was chosen.
    """

    chosen: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    min_work: int = 1 << 20

    def key(self, op: str, segs: Segments, k: int, n: int, max_rank: int, t: torch.Tensor):
        dev = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu"
        tokens = next_pow2(max(1, segs.total))
        return (op, len(segs), tokens, k, n, max_rank, str(t.dtype).removeprefix("torch."), dev)

    def pick(
        self,
        key: tuple,
        candidates: Sequence[Config],
        default: Config,
        launch: Callable[[Config], None],
        device: torch.device,
        work: int,
    ) -> Config:
        """The config for ``key``; ``work`` = elements the launch streams (tokens x width)."""
        if device.type != "cuda" or interpreting():
            return default
        if work < self.min_work:
            return candidates[0]
        if key in self.chosen:
            return self.chosen[key]
        times = {}
        for cfg in dict.fromkeys(candidates):  # dedupe after `fit`, keep order
            try:
                times[cfg] = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=15)
            except Exception as exc:  # e.g. OutOfResources: shared memory too small
                times[cfg] = math.inf
                self.timings.setdefault(key, {})[f"{cfg} failed"] = type(exc).__name__
        best = min(times, key=times.get)
        if math.isinf(times[best]):
            best = default
        self.chosen[key] = best
        self.timings.setdefault(key, {}).update({str(c): ms for c, ms in times.items()})
        return best

    def report(self) -> list[dict]:
        """One row per tuned key: the key fields, the chosen blocks, its time and the spread."""
        rows = []
        for key, cfg in self.chosen.items():
            op, tasks, tokens, k, n, r, dtype, dev = key
            ms = {c: v for c, v in self.timings.get(key, {}).items() if isinstance(v, float)}
            finite = [v for v in ms.values() if math.isfinite(v)]
            rows.append(dict(
                op=op, tasks=tasks, tokens_pow2=tokens, k=k, n=n, max_rank=r, dtype=dtype,
                device=dev, block_m=cfg.block_m, block_n=cfg.block_n, block_r=cfg.block_r,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                best_ms=min(finite) if finite else math.nan,
                worst_ms=max(finite) if finite else math.nan, candidates=len(ms),
            ))
        return rows


TUNER = Tuner()
"""The process-wide tuning cache (a cache of measurements, not configuration)."""
