"""Pipeline stages across processes: rank ``r`` of a torch.distributed group runs stage ``r``.

Every rank compiles the same tasks and is handed the same batches, so every rank builds the
same `StepPlan`. Rank ``r`` runs only ``plan.actions(r)``, in order:

- forward of micro-batch ``m`` of hTask ``h``: receive from rank ``r − 1`` the values crossing
  its boundary (activations, and anything later stages need that passes through), run stage
  ``r``'s module, send the values crossing the next boundary to rank ``r + 1``;
- backward: receive from rank ``r + 1`` the gradients of what was sent it, run autograd from
  those values (plus the task losses on the last stage, plus K/V kept for later chunks, which
  stays on this rank), send the gradients of what was received back to rank ``r − 1``.

Transfers are point-to-point (`torch.distributed.isend`/``irecv``; gloo on CPU, NCCL on CUDA),
tagged by (hTask, micro-batch, direction), each preceded by a small header with the shapes and
dtypes of that micro-batch's values (they change per step and per hTask). Sends are
non-blocking and waited at the end of the step; a receive waits at its point of use.

The step's losses are computed on the last rank and broadcast, so every rank returns the same
``{task: loss}``; that broadcast is also the commit point: a rank that fails before it makes
every other rank raise `PipelineError` (the group's timeout bounds the wait), and no rank steps
an optimizer for a step that did not complete everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from muxc.errors import OptionsError, PipelineError
from muxc.ir import MuxGraph, PartitionedGraph, StepPlan
from muxc.runtime.local import Boundary, LocalExecutor, _MicroBatch
from muxc.runtime.timeline import Timeline

__all__ = ["StageGroup", "StageExecutor", "join_stage_group"]

_FAILED_KEY = "muxc/pipeline/failed"
_MAX_DIMS = 8
_HEADER = 3 + _MAX_DIMS  # kind, dtype, ndim, dims...
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.bool, torch.uint8, torch.int8, torch.int16]
_NONE, _INT, _FLOAT, _BOOL, _TENSOR, _TENSOR_GRAD = range(6)


@dataclass(frozen=True)
class StageGroup:
    """This process's place in the pipeline: its rank (= its stage) among ``world`` ranks."""

    rank: int
    world: int
    group: object = field(repr=False)
    device: torch.device = torch.device("cpu")

    def fail_reason(self) -> str | None:
        """What the first failing rank left in the group's store (None: nothing yet)."""
        store = _store()
        if store is None:
            return None
        try:
            if store.check([_FAILED_KEY]):
                return store.get(_FAILED_KEY).decode()
        except RuntimeError:  # the store's host (rank 0) is gone
            return None
        return None

    def mark_failed(self, reason: str) -> None:
        store = _store()
        if store is None:
            return
        try:
            if not store.check([_FAILED_KEY]):
                store.set(_FAILED_KEY, reason)
        except RuntimeError:
            pass


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def join_stage_group(stages: int, timeout_s: float, device: torch.device) -> StageGroup | None:
    """The pipeline group for ``stages`` stages, or None to run every stage in this process.

    Uses the default process group when one is initialised, else initialises it from
    torchrun's environment (``WORLD_SIZE`` > 1). A group of one process runs in-process. Its
    size must equal ``stages``. muxc talks on its own subgroup with ``timeout_s``.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world == 1:
        return None
    if world != stages:
        raise OptionsError(
            f"stages={stages} but the torch.distributed group has {world} processes; run one "
            f"process per stage (torchrun --nproc-per-node {stages}) or set stages={world}"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return StageGroup(rank=dist.get_rank(), world=world, group=group, device=device)


def _tag(htask: int, micro_batch: int, backward: bool) -> int:
    return ((htask * 65536 + micro_batch) * 2 + int(backward)) * 256


@dataclass
class _Flight:
    """Non-blocking sends of one step, waited at its end (their buffers stay alive until then)."""

    works: list = field(default_factory=list)
    buffers: list = field(default_factory=list)


class StageExecutor(LocalExecutor):
    """Runs this rank's stage of each `StepPlan` (see module doc)."""

    def __init__(self, mux: MuxGraph, partitioned: PartitionedGraph, impl, group: StageGroup):
        super().__init__(mux, partitioned, impl)
        if self.partitioned is None or len(partitioned.stages) != group.world:
            raise OptionsError(f"the graph has no {group.world} stages to place on {group.world} ranks")
        self.group = group
        pg = self.partitioned
        me = group.rank
        placeholders = set(pg.input_names)
        produced: dict[str, int] = {}
        for st in pg.stages:
            for n in st.outputs:
                produced.setdefault(n, st.index)
        # crossing[b]: values made by stages <= b that a stage > b reads, in a fixed order
        self.crossing: list[tuple[str, ...]] = []
        for b in range(group.world - 1):
            later = {n for st in pg.stages[b + 1:] for n in st.inputs if n not in placeholders}
            self.crossing.append(tuple(n for n in produced if produced[n] <= b and n in later))
        self.owned = set(pg.stage_inputs(me)["bound"])
        self.timeline: Timeline | None = None

    # ------------------------------------------------------------------ ownership

    def owner_of(self, name: str) -> int:
        """The rank whose stage binds tensor ``name`` first."""
        for st in self.partitioned.stages:
            if name in st.inputs:
                return st.index
        return 0

    def release_unowned(self, models) -> int:
        """Drop the frozen tensors of other ranks' stages from the program and from ``models``
        (the tasks' own modules, whose parameters share those storages); returns bytes freed."""
        drop = {n: t for n, t in self.mux.tensors.items()
                if n not in self.owned and not t.requires_grad}
        kept = {t.untyped_storage().data_ptr() for n, t in self.mux.tensors.items() if n not in drop}
        ptrs = {t.untyped_storage().data_ptr() for t in drop.values()} - kept  # tied weights stay
        freed = sum(t.untyped_storage().nbytes() for t in drop.values()
                    if t.untyped_storage().data_ptr() in ptrs)
        for n in drop:
            del self.mux.tensors[n]
        seen = set()
        for model in models:
            for t in (*model.parameters(), *model.buffers()):
                if id(t) in seen or t.requires_grad or t.numel() == 0:
                    continue
                seen.add(id(t))
                if t.untyped_storage().data_ptr() in ptrs:
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return freed

    # ------------------------------------------------------------------ transport

    def _send(self, values: list, dst: int, tag: int, flight: _Flight) -> None:
        header = torch.zeros(len(values), _HEADER, dtype=torch.int64)
        payloads = []
        for i, v in enumerate(values):
            if v is None:
                header[i, 0] = _NONE
            elif isinstance(v, bool):
                header[i, 0], header[i, 3] = _BOOL, int(v)
            elif isinstance(v, int):
                header[i, 0], header[i, 3] = _INT, v
            elif isinstance(v, float):
                header[i, 0] = _FLOAT
                header[i, 3] = torch.tensor([v], dtype=torch.float64).view(torch.int64)[0]
            elif isinstance(v, torch.Tensor):
                if v.dim() > _MAX_DIMS:
                    raise PipelineError(f"cannot send a {v.dim()}-d tensor (at most {_MAX_DIMS})")
                header[i, 0] = _TENSOR_GRAD if v.requires_grad else _TENSOR
                header[i, 1] = _DTYPES.index(v.dtype)
                header[i, 2] = v.dim()
                header[i, 3:3 + v.dim()] = torch.tensor(v.shape, dtype=torch.int64)
                payloads.append(v.detach().contiguous())
            else:
                raise PipelineError(f"cannot send a {type(v).__name__} between stages")
        count = torch.tensor([len(values)], dtype=torch.int64)
        for k, buf in enumerate((count, header, *payloads)):
            flight.buffers.append(buf)
            flight.works.append(self._p2p(dist.isend, buf.to(self.group.device), dst, tag + k))

    def _recv(self, src: int, tag: int) -> list:
        dev = self.group.device  # NCCL receives into device memory; the header is read on the host
        count = torch.zeros(1, dtype=torch.int64, device=dev)
        self._p2p(dist.irecv, count, src, tag, wait=True)
        header = torch.zeros(int(count.cpu()[0]), _HEADER, dtype=torch.int64, device=dev)
        self._p2p(dist.irecv, header, src, tag + 1, wait=True)
        out, k = [], 2
        for row in header.cpu().tolist():
            kind = row[0]
            if kind == _NONE:
                out.append(None)
            elif kind == _BOOL:
                out.append(bool(row[3]))
            elif kind == _INT:
                out.append(row[3])
            elif kind == _FLOAT:
                out.append(float(torch.tensor([row[3]], dtype=torch.int64).view(torch.float64)[0]))
            else:
                shape = row[3:3 + row[2]]
                buf = torch.empty(shape, dtype=_DTYPES[row[1]], device=self.group.device)
                self._p2p(dist.irecv, buf, src, tag + k, wait=True)
                k += 1
                out.append(buf.requires_grad_(True) if kind == _TENSOR_GRAD else buf)
        return out

    def _p2p(self, op, tensor, peer: int, tag: int, wait: bool = False):
        try:
            work = op(tensor, peer, group=self.group.group, tag=tag)
            if wait:
                work.wait()
            return work
        except RuntimeError as e:
            raise self._failure(peer, e) from e

    def _failure(self, peer: int | None, err: BaseException) -> PipelineError:
        me = self.group.rank
        reason = self.group.fail_reason()
        if reason is None:
            culprit = f"rank {peer} (stage {peer})" if peer is not None else "another rank"
            reason = f"{culprit} stopped answering rank {me}"
            self.group.mark_failed(reason)
        return PipelineError(
            f"pipeline step failed on rank {me}: {reason} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); no optimizer step was applied for "
            "this step. Check that rank's log, then restart every rank (from a checkpoint)."
        )

    # ------------------------------------------------------------------ actions

    def _env(self, mb: _MicroBatch) -> dict:
        me = self.group.rank
        names = self.partitioned.stage_inputs(me)
        env = {n: self.mux.tensors[n] for n in names["bound"]}
        data = dict(mb.inputs)
        data["mux"] = mb.mux
        env.update({n: data[n] for n in names["data"]})
        return env

    def _stage_forward(self, mb: _MicroBatch, step, grad: bool, flight: _Flight):
        h, m = step.htask, step.micro_batch
        me, world = self.group.rank, self.group.world
        pg = self.partitioned
        mb.env = self._env(mb)
        received: list[torch.Tensor] = []
        if me > 0:
            values = self._recv(me - 1, _tag(h, m, False))
            for name, v in zip(self.crossing[me - 1], values):
                mb.env[name] = v
                if isinstance(v, torch.Tensor) and v.requires_grad:
                    received.append(v)
        mb.received = received
        before = dict(mb.mux.kv) if mb.mux.kv is not None else None
        with self.timeline.record(step):  # compute only: waiting for the receive is a bubble
            pg.stages[me].run(mb.env)
        if me == world - 1:
            self._set_losses(mb, pg.result(mb.env))
        else:
            out = [mb.env[n] for n in self.crossing[me]]
            self._send(out, me + 1, _tag(h, m, False), flight)
            mb.sent_values = [v for v in out if isinstance(v, torch.Tensor) and v.requires_grad]
        cut = Boundary()
        if grad:
            self._cut_kept_kv(mb, before, cut)
        mb.sent[me] = cut

    def _stage_backward(self, mb: _MicroBatch, step, flight: _Flight):
        h, m = step.htask, step.micro_batch
        me, world = self.group.rank, self.group.world
        outs, grads = mb.sent.pop(me).grads()
        if me < world - 1:
            back = self._recv(me + 1, _tag(h, m, True))
            for v, g in zip(mb.sent_values, back):
                outs.append(v)
                grads.append(g)
        else:
            self._add_losses(mb, outs, grads)
        with self.timeline.record(step):  # compute only: waiting for the gradients is a bubble
            if outs:
                torch.autograd.backward(outs, grads)
        if me == world - 1:
            self._release_graph(mb)
        if me > 0:
            back = [v.grad if v.grad is not None else torch.zeros_like(v) for v in mb.received]
            self._send(back, me - 1, _tag(h, m, True), flight)
        mb.env = {}

    # ------------------------------------------------------------------ running

    def run(self, plan: StepPlan, batches: Mapping[str, Mapping], training: bool = True,
            backward: bool = True) -> dict[str, torch.Tensor]:
        """Run this rank's actions of ``plan``; every rank returns every task's loss."""
        grad = backward and torch.is_grad_enabled()
        me = self.group.rank
        micro = self.micro_batches(plan, batches, training)
        self.executed = []
        self.timeline = Timeline(plan.stages)
        flight = _Flight()
        try:
            for step in plan.actions(me):
                mb = micro[step.htask][step.micro_batch]
                if not (step.is_forward or grad):
                    continue
                if step.is_forward:
                    self._stage_forward(mb, step, grad, flight)
                else:
                    self._stage_backward(mb, step, flight)
                self.executed.append(step)
            for w in flight.works:
                w.wait()
            return self._share_losses(micro, grad)
        except PipelineError:
            raise
        except Exception as e:
            self.group.mark_failed(f"rank {me} (stage {me}) raised {type(e).__name__}: {e}")
            raise

    def _share_losses(self, micro, grad: bool) -> dict[str, torch.Tensor]:
        """Broadcast the last stage's losses: the step's commit point (see module doc)."""
        last = self.group.world - 1
        tasks = self.mux.tasks
        buf = torch.full((len(tasks),), float("nan"), dtype=torch.float64)
        present = torch.zeros(len(tasks), dtype=torch.float64)
        if self.group.rank == last:
            totals = self.totals(micro, detach=True)
            for i, t in enumerate(tasks):
                loss = totals.get(t)
                if loss is not None:
                    buf[i], present[i] = float(loss), 1.0
        both = torch.stack([buf, present]).to(self.group.device)
        try:
            dist.broadcast(both, src=dist.get_global_rank(self.group.group, last),
                           group=self.group.group)
        except RuntimeError as e:
            raise self._failure(last if self.group.rank != last else None, e) from e
        both = both.cpu()
        dtype = next(iter(self.mux.tensors.values())).dtype
        return {t: both[0, i].to(torch.float32 if dtype != torch.float64 else dtype)
                for i, t in enumerate(tasks) if both[1, i] > 0}

    # ------------------------------------------------------------------ collectives

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """True where every rank's flag is true (each rank sees only its stage's gradients)."""
        buf = flags.to(device=self.group.device, dtype=torch.int32)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=self.group.group)
        return buf.to(device=flags.device, dtype=torch.bool)

    def gather_timeline(self) -> Timeline | None:
        """Every rank's timeline of the last step, on every rank (clocks aligned at the step's
        start; None before any step)."""
        if self.timeline is None:
            return None
        spans = [None] * self.group.world
        dist.all_gather_object(spans, self.timeline.spans, group=self.group.group)
        merged = Timeline(self.timeline.stages)
        for s in spans:
            merged.spans.update(s)
        return merged

    def share_params(self, named: Mapping[str, torch.Tensor]) -> None:
        """Make every rank's copy of each adapter tensor in ``named`` (placeholder name ->
        tensor) equal its owner's, in a fixed order."""
        for name in sorted(named):
            t = named[name]
            src = dist.get_global_rank(self.group.group, self.owner_of(name))
            buf = t.detach().clone().to(self.group.device)
            dist.broadcast(buf, src=src, group=self.group.group)
            with torch.no_grad():
                t.copy_(buf.to(t.device))
