"""Vocabulary of the cost model: op kinds, their keys, work polynomials and the roofline.

Every cost is ``latency(key, work)``: an `OpKey` names the kind of op and the shape facts its
latency depends on besides its size; *work* is the size, in a unit fixed per kind (tokens for
a frozen GEMM, score entries for attention, bytes for memory-bound ops; see `OpKind`).

Work of an op in a step is a `Poly` in the step's batch rows ``b`` and sequence length ``s``
(it is read off the symbolic shapes torch.export records), so one graph summary prices every
batch shape without re-walking the graph.

>>> Poly.tokens(3.0)(b=2, s=10)    # 3 * b * s
60.0
>>> str(OpKey(OpKind.GEMM, (128, 256)))
'gemm:float32:128x256'
>>> OpKey.parse('attention/mask:float32:4x32')
OpKey(kind=<OpKind.ATTENTION: 'attention'>, shape=(4, 32), dtype='float32', variant='mask')
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from muxc.errors import MuxcError

__all__ = [
    "CostModelError",
    "MATH",
    "OpKind",
    "OpKey",
    "Poly",
    "Roofline",
    "roofline_latency",
    "elementwise_backward_bytes",
]


MATH = "math"  # variant of ELEMENTWISE keys for transcendental pointwise ops


class CostModelError(MuxcError):
    """A cost profile or a cost query is malformed (bad file, unknown op kind, bad shape)."""


class OpKind(str, Enum):
    """Kinds of op the cost model prices, with the unit of their *work*.

    - GEMM: a frozen linear ``X (T, K) @ W.T (K, N)``; shape ``(K, N)``; work = tokens T.
      Backward computes dX only (frozen W has no gradient).
    - ATTENTION: scaled-dot-product attention; shape ``(heads, head_dim)``, variant the mask
      form (``mask``/``causal``/``none``); work = score entries ``b * heads * s * s_kv``.
    - LORA: one task's LoRA at one site, ``s * B(A(x))``; shape ``(K, N, rank)``; work =
      that task's tokens. Backward computes dx, dA and dB.
    - IA3: one task's IA3 scaling; shape ``(N,)``; work = that task's tokens.
    - LOSS: one task's causal-LM cross-entropy; shape ``(vocab,)``; work = that task's tokens.
    - ELEMENTWISE: any memory-bound op (pointwise, reductions, copies, gathers); work = bytes
      read + written (backward: `elementwise_backward_bytes`). Variant ``math`` (`MATH`):
      pointwise ops evaluating exp/pow/rsqrt-like functions, compute-bound on CPUs.
    - VIEW: a metadata-only op (view, slice, transpose, ...); work = 1 per op: pure overhead.
    - MATMUL: a matmul between activations (eager attention); work = FLOPs.
    """

    GEMM = "gemm"
    ATTENTION = "attention"
    LORA = "lora"
    IA3 = "ia3"
    LOSS = "loss"
    ELEMENTWISE = "elementwise"
    VIEW = "view"
    MATMUL = "matmul"


@dataclass(frozen=True, order=True)
class OpKey:
    """What an op's latency depends on besides its work; ``str()`` is its JSON key."""

    kind: OpKind
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    variant: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OpKind(self.kind))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise CostModelError(f"op key {self.kind.value}: negative dimension in {self.shape}")

    def __str__(self) -> str:
        kind = self.kind.value + (f"/{self.variant}" if self.variant else "")
        return f"{kind}:{self.dtype}:{'x'.join(map(str, self.shape))}"

    @staticmethod
    def parse(text: str) -> OpKey:
        """Inverse of ``str()``."""
        try:
            kind, dtype, shape = text.split(":")
            kind, _, variant = kind.partition("/")
            dims = tuple(int(d) for d in shape.split("x")) if shape else ()
            return OpKey(OpKind(kind), dims, dtype, variant)
        except ValueError as e:
            raise CostModelError(
                f"bad op key {text!r} ({e}); expected 'kind[/variant]:dtype:d1xd2...', e.g. "
                "'gemm:float32:128x256'"
            ) from None

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE.get(self.dtype, 4)


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "bool": 1, "uint8": 1, "int8": 1}


@dataclass(frozen=True)
class Poly:
    """``sum(c * b**i * s**j)`` over ``terms = ((i, j, c), ...)``: work as a function of shape.

    ``b`` is the number of batch rows (of the whole step, or of one task for per-task ops),
    ``s`` the (padded) sequence length.
    """

    terms: tuple[tuple[int, int, float], ...] = ()

    def __call__(self, b: float, s: float) -> float:
        total = 0  # summed in order, as ``sum`` would (a loop: the planner calls this often)
        for i, j, c in self.terms:
            total += c * b**i * s**j
        return total

    def __add__(self, other: Poly) -> Poly:
        acc: dict[tuple[int, int], float] = {}
        for i, j, c in (*self.terms, *other.terms):
            acc[(i, j)] = acc.get((i, j), 0.0) + c
        return Poly(tuple(sorted((i, j, c) for (i, j), c in acc.items() if c != 0.0)))

    def scale(self, k: float) -> Poly:
        return Poly(tuple((i, j, c * k) for i, j, c in self.terms if c * k != 0.0))

    @staticmethod
    def const(c: float) -> Poly:
        return Poly(((0, 0, float(c)),) if c else ())

    @staticmethod
    def tokens(c: float = 1.0) -> Poly:
        """``c * b * s``: proportional to the number of tokens."""
        return Poly(((1, 1, float(c)),) if c else ())

    def __repr__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for i, j, c in self.terms:
            mono = "*".join(["b"] * i + ["s"] * j)
            parts.append(f"{c:g}" + (f"*{mono}" if mono else ""))
        return " + ".join(parts)


def elementwise_backward_bytes(out_bytes: float, grad_input_bytes: list[float]) -> float:
    """Backward bytes of a memory-bound op: per input needing a gradient, one kernel reading
    the output gradient and one saved operand and writing that input's gradient.

    >>> elementwise_backward_bytes(400.0, [400.0, 400.0])   # a * b, both need grads
    2400.0
    """
    return sum(3.0 * max(out_bytes, g) for g in grad_input_bytes)


@dataclass(frozen=True)
class Roofline:
    """Analytic fallback: ``max(flops / peak_flops, bytes / peak_bandwidth) + overhead``.

    >>> r = Roofline(peak_flops=1e12, peak_bandwidth=1e11, overhead=1e-5)
    >>> round(r.latency(flops=2e9, nbytes=1e6), 6)   # compute-bound: 2 ms + 10 us
    0.00201
    """

    peak_flops: float
    peak_bandwidth: float
    overhead: float = 1e-5  # seconds per op call (launch or dispatch), paid per micro-batch
    # seconds per run of the graph beyond its ops (calling it, starting the autograd engine:
    # host work on CPU and GPU alike), paid once per micro-batch; `CostModel.run_overhead`
    run_overhead: float = 0.0

    def __post_init__(self) -> None:
        if not (self.peak_flops > 0 and self.peak_bandwidth > 0 and self.overhead >= 0
                and self.run_overhead >= 0):
            raise CostModelError(
                f"roofline needs peak_flops > 0, peak_bandwidth > 0, overhead >= 0, "
                f"run_overhead >= 0; got {self.peak_flops}, {self.peak_bandwidth}, "
                f"{self.overhead}, {self.run_overhead}"
            )

    def latency(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak_flops, nbytes / self.peak_bandwidth) + self.overhead

    @staticmethod
    def for_device(name: str, dtype: str = "float32") -> Roofline:
        """Datasheet peaks for a few accelerators (dense, no sparsity), else a CPU guess.

        >>> Roofline.for_device("NVIDIA H100 80GB HBM3", "bfloat16").peak_flops
        989000000000000.0
        """
        half = dtype in ("float16", "bfloat16")
        # run_overhead: one forward+backward run of a traced graph beyond its ops, host-side
        # (`measure_run_overhead`: 30-110 us on the 2-vCPU Xeon VM, 1 thread)
        for tag, (f32, f16, bw) in _DATASHEETS.items():
            if tag in name:
                return Roofline(f16 if half else f32, bw, 5e-6, 5e-5)
        # a few cores of a server CPU, fp32; overhead: one aten op call through a traced graph,
        # forward or backward (`measure_call_overhead`: 4-7 us on a 2-core EPYC, 1 thread)
        return Roofline(1e11, 1e10, 5e-6, 5e-5)


# name substring -> (fp32 FLOP/s without TF32, fp16/bf16 tensor-core FLOP/s, bytes/s)
_DATASHEETS = {
    "H200": (67e12, 989e12, 4.8e12),
    "H100": (67e12, 989e12, 3.35e12),
    "A100": (19.5e12, 312e12, 2.0e12),
}


def _flops_bytes(key: OpKey, work: float, backward: bool) -> tuple[float, float]:
    """FLOPs and bytes of ``work`` units of ``key`` (forward, or backward when asked)."""
    e = key.itemsize
    k = key.kind
    if k is OpKind.GEMM:
        kk, n = key.shape
        return 2.0 * work * kk * n, e * (work * (kk + n) + kk * n)
    if k is OpKind.ATTENTION:
        _, d = key.shape
        flops = 4.0 * work * d * (2.5 if backward else 1.0)
        return flops, e * 4.0 * d * work ** 0.5  # K/V mostly from cache; a rough floor
    if k is OpKind.LORA:
        kk, n, r = key.shape
        flops = 2.0 * work * r * (kk + n) * (2.0 if backward else 1.0)
        return flops, e * work * (kk + n) * (2.0 if backward else 1.0)
    if k is OpKind.IA3:
        (n,) = key.shape
        return work * n, e * 3.0 * work * n
    if k is OpKind.LOSS:
        (v,) = key.shape
        return 5.0 * work * v, 4.0 * work * v * (4.0 if backward else 3.0)
    if k is OpKind.ELEMENTWISE:
        return 0.0, work
    if k is OpKind.MATMUL:
        return work, 0.0
    return 0.0, 0.0  # VIEW


def roofline_latency(roof: Roofline, key: OpKey, work: float, backward: bool = False) -> float:
    """Roofline latency of ``work`` units of ``key``; VIEW ops cost the overhead only.

    >>> r = Roofline(1e12, 1e11, 0.0)
    >>> roofline_latency(r, OpKey(OpKind.GEMM, (1000, 1000)), 1000)   # 2 GFLOP at 1 TFLOP/s
    0.002
    """
    if work <= 0:
        return 0.0
    flops, nbytes = _flops_bytes(key, work, backward)
    return roof.latency(flops, nbytes)
