"""Short on-device micro-profile of the ops a program runs, cached per device as JSON.

`profile_device(device, keys)` times each `OpKey` (forward and backward separately) at a few
work sizes, e.g. a frozen GEMM fwd+bwd at 16..4096 tokens, attention at a few sequence lengths,
and an elementwise probe for bandwidth and per-op overhead. A `DeviceProfile` holds the raw
samples plus the measured peaks (for the roofline fallback) and the identity of the device
they were taken on; `load_or_profile` reuses a saved profile when the identity matches and
profiles only what is missing.

>>> prof = profile_device("cpu", [OpKey(OpKind.GEMM, (64, 64))], tokens=(16, 64))
>>> [s.work for s in prof.samples["gemm:float32:64x64"]]
[16.0, 64.0]
>>> DeviceProfile.from_json(prof.to_json()) == prof
True
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.fx as fx

from muxc.plan.ops import MATH, CostModelError, OpKey, OpKind, Roofline

__all__ = [
    "Clock",
    "Sample",
    "DeviceProfile",
    "DEFAULT_TOKENS",
    "DEFAULT_ATTENTION_SHAPES",
    "DEFAULT_ELEMENTWISE_NUMELS",
    "device_identity",
    "profile_device",
    "load_or_profile",
    "measure_call_overhead",
    "measure_run_overhead",
    "measure_site_task_overhead",
]

FORMAT = 4  # 2: call_overhead; 3: adapter probes call like a site (base=, arguments built once);
# 4: adapter probes call a real site, run_overhead and site_task overheads
aten = torch.ops.aten  # probes call the same OpOverloads exported graphs call
DEFAULT_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_ATTENTION_SHAPES = ((1, 32), (1, 64), (1, 128), (2, 128), (1, 256), (2, 256), (4, 256),
                            (1, 512), (2, 512))  # (batch rows, sequence length)
DEFAULT_ELEMENTWISE_NUMELS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)
_VIEW_CHAIN = 16  # views per VIEW sample; the sample is the time per view
_CALL_CHAIN = 128  # tiny ops in the graph timed for the per-call overhead
_SHORT_CHAIN = 1  # ... and in the one-op graph whose time, less its op, is the per-run cost
# (one op, then backward(): the very shape of every probe, whose backward paid the same start)
_SITE_TASKS = 4  # tasks at the site timed for the per-task site overhead


class Clock(str, Enum):
    """How a profile (and whoever compares against it) measures time.

    WALL: ``time.perf_counter`` with a device synchronize around each measurement.
    THREAD: CPU time of the calling thread (``time.thread_time``); immune to other processes
    taking the cores, meaningful only on CPU with ``torch.get_num_threads() == 1``.
    """

    WALL = "wall"
    THREAD = "thread"

    def now(self, device: torch.device) -> float:
        if self is Clock.THREAD:
            return time.thread_time()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def check(self, device: torch.device) -> None:
        if self is Clock.THREAD and (device.type != "cpu" or torch.get_num_threads() != 1):
            raise CostModelError(
                f"clock='thread' measures one CPU thread; it needs a cpu device and "
                f"torch.get_num_threads() == 1 (got {device.type}, "
                f"{torch.get_num_threads()} threads); use clock='wall' or set 1 thread"
            )


@dataclass(frozen=True)
class Sample:
    """One timed work size: median forward and backward seconds over the repeats.

    ``backward_work`` is the backward's own work when its unit differs (elementwise bytes).
    """

    work: float
    forward: float
    backward: float
    backward_work: float | None = None

    def to_json(self) -> list[float | None]:
        return [self.work, self.forward, self.backward, self.backward_work]

    @staticmethod
    def from_json(row: Sequence) -> Sample:
        if len(row) != 4:
            raise CostModelError(f"bad profile sample {row!r}: expected [work, fwd, bwd, bwd_work]")
        w, f, b, bw = row
        return Sample(float(w), float(f), float(b), None if bw is None else float(bw))


def device_identity(device: torch.device | str) -> dict[str, str | int]:
    """What a profile is only valid for: device kind and name, torch version, CPU threads.

    >>> sorted(device_identity("cpu"))
    ['device_kind', 'device_name', 'threads', 'torch']
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device_kind": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclass(frozen=True)
class DeviceProfile:
    """Latency samples per op key, measured on one device, and that device's peaks.

    ``samples`` maps ``str(OpKey)`` to its samples (sorted by work). ``peak_flops``,
    ``peak_bandwidth`` and ``overhead`` are the best measured GEMM FLOP/s, elementwise bytes/s
    and smallest per-op time; they parametrise the roofline for ops without samples.
    ``call_overhead``: seconds each op call costs in a graph beyond its own latency
    (`measure_call_overhead`); the cost model charges it per op per micro-batch.
    ``run_overhead``: seconds one forward+backward run of a graph costs whatever its ops
    (calling the graph, starting the autograd engine; `measure_run_overhead`), paid once per
    micro-batch; ``backward_start``: the engine start alone, which every probe's backward
    sample also paid (`CostModel` takes it out of them).
    ``site_task_forward``/``site_task_backward``: seconds each task beyond the first adds to
    one adapter site call at almost no work (its arguments, segment bookkeeping;
    `measure_site_task_overhead`).
    """

    identity: Mapping[str, str | int]
    clock: Clock
    peak_flops: float
    peak_bandwidth: float
    overhead: float
    samples: Mapping[str, tuple[Sample, ...]] = field(default_factory=dict)
    call_overhead: float = 0.0
    run_overhead: float = 0.0
    backward_start: float = 0.0
    site_task_forward: float = 0.0
    site_task_backward: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clock", Clock(self.clock))
        object.__setattr__(self, "identity", dict(self.identity))
        object.__setattr__(self, "samples", {k: tuple(sorted(v, key=lambda s: s.work))
                                             for k, v in sorted(self.samples.items())})

    def __repr__(self) -> str:
        i = self.identity
        return (f"DeviceProfile({i.get('device_kind')}: {i.get('device_name')!r}, "
                f"{len(self.samples)} op keys, {self.peak_flops / 1e9:.1f} GFLOP/s, "
                f"{self.peak_bandwidth / 1e9:.1f} GB/s, clock={self.clock.value})")

    @property
    def device_name(self) -> str:
        return str(self.identity.get("device_name", ""))

    def keys(self) -> list[OpKey]:
        return [OpKey.parse(k) for k in self.samples]

    def missing(self, keys: Iterable[OpKey]) -> list[OpKey]:
        """The profiled kinds among ``keys`` that have no samples here."""
        return sorted({k for k in keys if k.kind in PROBES and str(k) not in self.samples})

    def roofline(self) -> Roofline:
        return Roofline(self.peak_flops, self.peak_bandwidth, self.overhead)

    def merge(self, other: DeviceProfile) -> DeviceProfile:
        """Samples of both (same device and clock); repeated work sizes keep both samples."""
        if dict(other.identity) != dict(self.identity) or other.clock is not self.clock:
            raise CostModelError(
                f"cannot merge profiles of different devices/clocks: {dict(self.identity)} "
                f"({self.clock.value}) vs {dict(other.identity)} ({other.clock.value})"
            )
        samples = {k: list(v) for k, v in self.samples.items()}
        for k, v in other.samples.items():
            samples.setdefault(k, []).extend(v)
        return DeviceProfile(
            self.identity,
            self.clock,
            max(self.peak_flops, other.peak_flops),
            max(self.peak_bandwidth, other.peak_bandwidth),
            min(self.overhead, other.overhead),
            {k: tuple(v) for k, v in samples.items()},
            **{f: statistics.median([getattr(self, f), getattr(other, f)]) for f in _SCALARS},
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "identity": dict(self.identity),
            "clock": self.clock.value,
            "peak_flops": self.peak_flops,
            "peak_bandwidth": self.peak_bandwidth,
            "overhead": self.overhead,
            **{f: getattr(self, f) for f in _SCALARS},
            "samples": {k: [s.to_json() for s in v] for k, v in self.samples.items()},
        }

    @staticmethod
    def from_json(data: Mapping) -> DeviceProfile:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise CostModelError(
                f"not a muxc device profile of format {FORMAT} (got format {got!r}); delete the "
                "file to re-profile"
            )
        try:
            samples = {}
            for k, rows in data["samples"].items():
                OpKey.parse(k)
                samples[k] = tuple(Sample.from_json(r) for r in rows)
            return DeviceProfile(
                identity=data["identity"],
                clock=Clock(data["clock"]),
                peak_flops=float(data["peak_flops"]),
                peak_bandwidth=float(data["peak_bandwidth"]),
                overhead=float(data["overhead"]),
                samples=samples,
                **{f: float(data[f]) for f in _SCALARS},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CostModelError(
                f"malformed device profile ({type(e).__name__}: {e}); delete it to re-profile"
            ) from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return path

    @staticmethod
    def load(path: str | Path) -> DeviceProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CostModelError(f"no device profile at {str(path)!r}; run profile_device or "
                                 "load_or_profile to create it") from None
        except json.JSONDecodeError as e:
            raise CostModelError(f"device profile {str(path)!r} is not JSON ({e}); delete it to "
                                 "re-profile") from None
        return DeviceProfile.from_json(data)


_SCALARS = ("call_overhead", "run_overhead", "backward_start", "site_task_forward",
            "site_task_backward")
"""`DeviceProfile`'s measured overheads (seconds), saved and merged (median) alike."""


# ------------------------------------------------------------------------------- probes
#
# A probe builds inputs for one work size and returns (forward_fn, backward_work): calling
# forward_fn() runs the op and returns the tensor whose .backward() runs its backward.

Probe = Callable[[OpKey, int, torch.device], tuple[Callable[[], torch.Tensor], float | None]]


def _dtype(key: OpKey) -> torch.dtype:
    dt = getattr(torch, key.dtype, None)
    if not isinstance(dt, torch.dtype):
        raise CostModelError(f"op key {key}: unknown dtype {key.dtype!r}")
    return dt


def _leaf(*shape, device, dtype, grad=True) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).div_(4).requires_grad_(grad)


def _probe_gemm(key: OpKey, tokens: int, device):
    k, n = key.shape
    dt = _dtype(key)
    x = _leaf(tokens, k, device=device, dtype=dt)
    w = _leaf(n, k, device=device, dtype=dt, grad=False)
    return (lambda: aten.linear.default(x, w)), None


def _probe_attention(key: OpKey, shape: tuple[int, int], device):
    heads, d = key.shape
    b, s = shape
    dt = _dtype(key)
    # like HF: (b, s, heads, d) projections viewed as (b, heads, s, d)
    q, k, v = (_leaf(b, s, heads, d, device=device, dtype=dt) for _ in range(3))
    kwargs = {}
    if key.variant == "mask":
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        kwargs["attn_mask"] = causal.expand(b, 1, s, s).contiguous()
    elif key.variant == "causal":
        kwargs["is_causal"] = True

    def fwd():
        return aten.scaled_dot_product_attention.default(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs
        )

    return fwd, None


def _site_call(kind: str, key: OpKey, tokens: int, device, tasks: int = 1, mixed: bool = False):
    """A one-layer adapter site of ``tasks`` tasks (``tokens`` each) of ``kind`` on a
    ``(K, N[, rank])`` base op, called as the merged graph calls it (`muxc.ir.OutputSite`
    through the runtime's site implementation: parameters by task, the kind's ``apply``, one
    multi-task kernel call), with its arguments built once; ``mixed``: LoRA task ``i`` has
    rank ``4 * 2**i`` instead of the key's. Returns the forward."""
    # how sites run is bound when the muxc package is imported (muxc/__init__ imports runtime)
    from muxc.ir import AdapterRecord, Aggregate, AdapterKind, Dispatch, MuxBatch, OutputSite

    dt = _dtype(key)
    names = tuple(f"t{i}" for i in range(tasks))
    if kind == "lora":
        k, n, r = key.shape
        ranks = [4 << i if mixed else r for i in range(tasks)]
        make = lambda i: {"A": _leaf(ranks[i], k, device=device, dtype=dt),  # noqa: E731
                          "B": _leaf(n, ranks[i], device=device, dtype=dt)}
        extra = dict(kind=AdapterKind.LORA, dispatch=Dispatch.PARALLEL,
                     aggregate=Aggregate.ADD_SCALED, scaling=2.0)
    else:
        (n,) = key.shape
        k = n
        ranks = [0] * tasks
        make = lambda i: {"v": _leaf(n, device=device, dtype=dt)}  # noqa: E731
        extra = dict(kind=AdapterKind.IA3, dispatch=Dispatch.OUTPUT,
                     aggregate=Aggregate.SCALE_OUTPUT)
    records = []
    for i, t in enumerate(names):
        params = make(i)
        records.append(AdapterRecord(task=t, site="probe", params=params, rank=ranks[i],
                                     param_names={p: f"{t}.{p}" for p in params}, **extra))
    site = OutputSite("probe", tuple(records))
    x = _leaf(tasks, tokens, k, device=device, dtype=dt)
    h = _leaf(tasks, tokens, n, device=device, dtype=dt)  # the base op's output
    labels = tuple(torch.zeros(1, tokens, dtype=torch.long, device=device) for _ in names)
    mux = MuxBatch(tasks=names, rows=(1,) * tasks, seq_len=tokens, labels=labels)
    flat = [p for r in records for p in r.params.values()]
    return lambda: site(x, h, mux, *flat)


def _probe_lora(key: OpKey, tokens: int, device):
    return _site_call("lora", key, tokens, device), None


def _probe_ia3(key: OpKey, tokens: int, device):
    return _site_call("ia3", key, tokens, device), None


def _probe_loss(key: OpKey, tokens: int, device):
    from muxc.ir import causal_lm_loss

    (vocab,) = key.shape
    logits = _leaf(1, tokens, vocab, device=device, dtype=_dtype(key))
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    return (lambda: causal_lm_loss(logits, labels)), None


def _probe_elementwise(key: OpKey, numel: int, device):
    """Memory-bound ops: ``a * b``; MATH ops (exp, silu, ...: compute-bound on CPUs): silu."""
    dt = _dtype(key)
    a = _leaf(numel, device=device, dtype=dt)
    nbytes = numel * key.itemsize
    if key.variant == MATH:
        return (lambda: aten.silu.default(a)), 3.0 * nbytes  # elementwise_backward_bytes(n, [n])
    b = _leaf(numel, device=device, dtype=dt)
    return (lambda: aten.mul.Tensor(a, b)), 6.0 * nbytes  # = elementwise_backward_bytes(n, [n, n])


def _probe_view(key: OpKey, _: int, device):
    x = _leaf(8, 16, device=device, dtype=_dtype(key))
    shapes = ([16, 8], [8, 16])

    def fwd():
        y = x
        for i in range(_VIEW_CHAIN // 2):
            y = aten.transpose.int(y, 0, 1)
            y = aten.view.default(y, shapes[i % 2])
        return y

    return fwd, 1.0


PROBES: dict[OpKind, Probe] = {
    OpKind.GEMM: _probe_gemm,
    OpKind.ATTENTION: _probe_attention,
    OpKind.LORA: _probe_lora,
    OpKind.IA3: _probe_ia3,
    OpKind.LOSS: _probe_loss,
    OpKind.ELEMENTWISE: _probe_elementwise,
    OpKind.VIEW: _probe_view,
}


def _work(key: OpKey, size) -> float:
    if key.kind is OpKind.ATTENTION:
        b, s = size
        return float(b * key.shape[0] * s * s)
    if key.kind is OpKind.ELEMENTWISE:
        return (2.0 if key.variant == MATH else 3.0) * size * key.itemsize
    if key.kind is OpKind.VIEW:
        return 1.0
    return float(size)


def _times(fwd: Callable[[], torch.Tensor], device, clock: Clock, repeats: int, warmup: int,
              per: int, flush: torch.Tensor | None) -> tuple[list[float], list[float]]:
    """Forward and backward seconds of each of ``repeats`` runs after ``warmup``; with
    ``flush``, caches are evicted (by writing ``flush``) before each, outside the timed
    region."""
    leaves: list[torch.Tensor] = []
    f_times, b_times = [], []
    for i in range(warmup + repeats):
        for t in leaves:
            t.grad = None
        if flush is not None:
            flush.add_(1)
        t0 = clock.now(device)
        out = fwd()
        t1 = clock.now(device)
        grad = torch.ones_like(out)
        if flush is not None:
            flush.add_(1)
        t2 = clock.now(device)
        out.backward(grad)
        t3 = clock.now(device)
        if i >= warmup:
            f_times.append((t1 - t0) / per)
            b_times.append((t3 - t2) / per)
        if not leaves:
            leaves = _leaves_of(out)
    return f_times, b_times


def _time_one(fwd: Callable[[], torch.Tensor], device, clock: Clock, repeats: int, warmup: int,
              per: int, flush: torch.Tensor | None) -> tuple[float, float]:
    """Median forward and backward seconds of `_times`."""
    f, b = _times(fwd, device, clock, repeats, warmup, per, flush)
    return statistics.median(f), statistics.median(b)


def _leaves_of(out: torch.Tensor) -> list[torch.Tensor]:
    seen, stack, found = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return found


def profile_device(
    device: torch.device | str,
    keys: Iterable[OpKey],
    *,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    attention_shapes: Sequence[tuple[int, int]] = DEFAULT_ATTENTION_SHAPES,
    elementwise_numels: Sequence[int] = DEFAULT_ELEMENTWISE_NUMELS,
    repeats: int = 5,
    warmup: int = 1,
    clock: Clock | str = Clock.WALL,
    cold_bytes: int | None = None,
    rounds: int = 3,
) -> DeviceProfile:
    """Time every profilable key in ``keys`` (plus the elementwise and view probes) on ``device``.

    Each key is timed at each work size (``tokens`` for GEMM/LoRA/IA3/loss, ``(rows, seq)``
    ``attention_shapes`` for attention, ``elementwise_numels`` elements for the elementwise
    probe): the median of ``repeats`` runs, taken in ``rounds`` passes over all keys and sizes
    (each pass ``warmup`` untimed runs first). MATMUL keys are not profiled (roofline). Takes a few seconds for a small model on a 2-core CPU.

    ``cold_bytes``: when set, elementwise probes run cache-cold (that many bytes written
    between runs, untimed), as in a step whose activations overflow the last-level cache; on
    this CPU 16 MiB doubled a 1 MB add's latency, which matched a 2048-token step but
    overstated a 256-token one, so the default is warm. GEMM, attention and adapter probes
    always run warm (their cost is compute, and matched in-graph timings).
    """
    device = torch.device(device)
    clock = Clock(clock)
    clock.check(device)
    if repeats < 1 or warmup < 0:
        raise CostModelError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    wanted = set(keys) | {OpKey(OpKind.ELEMENTWISE), OpKey(OpKind.VIEW)}
    flush = None
    if cold_bytes:
        flush = torch.zeros(cold_bytes // 4, dtype=torch.float32, device=device)
    jobs = []  # (key, size, work), in a fixed order
    for key in sorted(k for k in wanted if k.kind in PROBES):
        if key.kind is OpKind.ATTENTION:
            sizes: Sequence = attention_shapes
        elif key.kind is OpKind.ELEMENTWISE:
            sizes = elementwise_numels
        elif key.kind is OpKind.VIEW:
            sizes = (1,)
        else:
            sizes = tokens
        jobs += [(key, size) for size in sizes]
    # the repeats are spread over `rounds` passes over every job, so a spell of load from
    # other processes lands on many keys a little instead of on one key entirely
    rounds = max(1, min(rounds, repeats))
    per_round = -(-repeats // rounds)
    times: dict[int, tuple[list[float], list[float], float | None]] = {}
    for _ in range(rounds):
        for i, (key, size) in enumerate(jobs):
            fwd, bwd_work = PROBES[key.kind](key, size, device)
            per = _VIEW_CHAIN if key.kind is OpKind.VIEW else 1
            cold = flush if key.kind is OpKind.ELEMENTWISE else None
            f, b = _times(fwd, device, clock, per_round, warmup, per, cold)
            fs, bs, _ = times.setdefault(i, ([], [], bwd_work))
            fs += f
            bs += b
            del fwd
    samples: dict[str, tuple[Sample, ...]] = {}
    for i, (key, size) in enumerate(jobs):
        fs, bs, bwd_work = times[i]
        row = Sample(_work(key, size), statistics.median(fs), statistics.median(bs), bwd_work)
        samples[str(key)] = (*samples.get(str(key), ()), row)
    return DeviceProfile(
        identity=device_identity(device),
        clock=clock,
        peak_flops=_peak_flops(samples),
        peak_bandwidth=_peak_bandwidth(samples),
        overhead=min(s.forward for s in samples[str(OpKey(OpKind.ELEMENTWISE))]),
        samples=samples,
        call_overhead=measure_call_overhead(device, clock, repeats=max(repeats, 5)),
        **_run_and_site(device, clock, max(repeats, 5)),
    )


def _run_and_site(device, clock: Clock, repeats: int) -> dict[str, float]:
    run, start = measure_run_overhead(device, clock, repeats=repeats)
    f, b = measure_site_task_overhead(device, clock, repeats=repeats)
    return {"run_overhead": run, "backward_start": start, "site_task_forward": f,
            "site_task_backward": b}


def _chain(ops: int) -> fx.GraphModule:
    """A traced graph of ``ops`` tiny multiplies and adds on ``(x, w)``."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = x
    for i in range(ops):
        y = g.call_function(aten.mul.Tensor if i % 2 == 0 else aten.add.Tensor, (y, w))
    g.output(y)
    return fx.GraphModule(torch.nn.Module(), g)


def _time_chain(ops: int, device, clock: Clock, repeats: int) -> tuple[float, float]:
    """Median seconds of the forward and of the backward of `_chain` (``ops`` ops), as the
    runtime runs a micro-batch: the graph called, then one ``backward()``."""
    gm = _chain(ops)
    xs = torch.randn(4, 8, device=device)
    ws = torch.randn(4, 8, device=device, requires_grad=True)
    fs, bs = [], []
    for i in range(repeats + 1):
        ws.grad = None
        t0 = clock.now(device)
        y = gm(xs, ws)
        t1 = clock.now(device)
        y.backward(torch.ones_like(xs))
        t2 = clock.now(device)
        if i:  # the first run warms up
            fs.append(t1 - t0)
            bs.append(t2 - t1)
    return statistics.median(fs), statistics.median(bs)


def measure_call_overhead(device: torch.device | str, clock: Clock | str = Clock.WALL, *,
                          ops: int = _CALL_CHAIN, repeats: int = 5) -> float:
    """Seconds one op call costs inside a traced graph with (almost) no work: a
    `torch.fx.GraphModule` of ``ops`` tiny multiplies and adds run forward and backward (one
    ``backward()``), as the runtime runs a micro-batch; per op call, forward and backward
    calls averaged, median of ``repeats``.

    >>> 0 < measure_call_overhead("cpu", ops=8, repeats=2) < 1e-3
    True
    """
    device = torch.device(device)
    f, b = _time_chain(ops, device, Clock(clock), repeats)
    return (f + b) / (2 * ops)


def measure_run_overhead(device: torch.device | str, clock: Clock | str = Clock.WALL, *,
                         repeats: int = 5) -> tuple[float, float]:
    """``(per run, backward start)``: seconds a forward+backward run of a traced graph costs
    beyond its ops, and the part of it its ``backward()`` pays before any op's backward
    (engine start, seed gradient).

    Two chains of tiny ops (`_CALL_CHAIN` long and one op, as a probe runs) are timed; the
    time per op is their difference over the difference in ops, the per-run cost what is left
    of the one-op graph's time. Never negative.

    >>> run, start = measure_run_overhead("cpu", repeats=2)
    >>> 0 <= start <= run < 1e-2
    True
    """
    device, clock = torch.device(device), Clock(clock)
    long_f, long_b = _time_chain(_CALL_CHAIN, device, clock, repeats)
    short_f, short_b = _time_chain(_SHORT_CHAIN, device, clock, repeats)
    span = _CALL_CHAIN - _SHORT_CHAIN
    per_f = max(long_f - short_f, 0.0) / span
    per_b = max(long_b - short_b, 0.0) / span
    run_f = max(short_f - _SHORT_CHAIN * per_f, 0.0)
    start = max(short_b - _SHORT_CHAIN * per_b, 0.0)
    return run_f + start, start


def measure_site_task_overhead(device: torch.device | str, clock: Clock | str = Clock.WALL, *,
                               repeats: int = 5, tasks: int = _SITE_TASKS) -> tuple[float, float]:
    """``(forward, backward)`` seconds each task beyond the first adds to one LoRA site call
    at 16 tokens per task: a site of ``tasks`` tasks less a site of one task holding all their
    tokens, over ``tasks - 1`` (never negative).

    >>> f, b = measure_site_task_overhead("cpu", repeats=2, tasks=2)
    >>> 0 <= f < 1e-2 and 0 <= b < 1e-2
    True
    """
    device, clock = torch.device(device), Clock(clock)
    key = OpKey(OpKind.LORA, (64, 64, 8))
    tokens = 16
    # tasks of different ranks (4, 8, 16, ...), as tenants' adapters are: the multi-task
    # kernel stacks and masks them, which costs more per task than equal ranks
    many = _time_one(_site_call("lora", key, tokens, device, tasks, mixed=True), device, clock,
                     repeats, 1, 1, None)
    one_big = _time_one(_site_call("lora", key, tokens * tasks, device), device, clock,
                        repeats, 1, 1, None)
    # many tasks = one task of all the tokens + a per-task cost for each task beyond the first
    return tuple(max(m - o, 0.0) / (tasks - 1) for m, o in zip(many, one_big))  # type: ignore


def _peak_flops(samples: Mapping[str, Sequence[Sample]]) -> float:
    best = 0.0
    for k, rows in samples.items():
        key = OpKey.parse(k)
        if key.kind is OpKind.GEMM:
            kk, n = key.shape
            best = max([best, *(2.0 * s.work * kk * n / s.forward for s in rows if s.forward > 0)])
    return best or 1e11


def _peak_bandwidth(samples: Mapping[str, Sequence[Sample]]) -> float:
    rows = samples.get(str(OpKey(OpKind.ELEMENTWISE)), ())
    return max((s.work / s.forward for s in rows if s.forward > 0), default=1e10)


def load_or_profile(
    path: str | Path,
    device: torch.device | str,
    keys: Iterable[OpKey],
    *,
    profiler: Callable[..., DeviceProfile] | None = None,
    **profile_kwargs,
) -> DeviceProfile:
    """The profile saved at ``path`` when it was taken on this device (same identity and
    clock), with any missing keys profiled and saved back; else a fresh profile, saved.

    ``profiler``: what profiles (`profile_device`'s arguments; default `profile_device`, in
    this process); ``Options(cost_model=path)`` passes `muxc.plan.isolated.profile_in_child`.
    """
    profile = profile_device if profiler is None else profiler
    path = Path(path)
    keys = list(keys)
    clock = Clock(profile_kwargs.get("clock", Clock.WALL))
    here = device_identity(device)
    old = None
    if path.exists():
        try:
            old = DeviceProfile.load(path)
        except CostModelError:  # an older format (or a broken file): profile afresh
            old = None
        if old is not None and (dict(old.identity) != here or old.clock is not clock):
            old = None  # another device, torch or thread count: stale
    if old is not None:
        missing = old.missing(keys)
        if not missing:
            return old
        new = old.merge(profile(device, missing, **profile_kwargs))
    else:
        new = profile(device, keys, **profile_kwargs)
    new.save(path)
    return new

