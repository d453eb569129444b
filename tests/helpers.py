"""Isolated-PEFT references, comparisons, and compiled cases for equivalence tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import muxc

REL_TOL = 1e-4  # fp32; observed errors are ~1e-7 (summation order differs between layouts)


def isolated(model, batch, adapter: str | None = None):
    """Loss and adapter grads of ``model(**batch).loss.backward()`` alone; leaves grads zeroed."""
    if adapter is not None:
        model.set_adapter(adapter)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_matches(losses, grads_of, refs, tol: float = REL_TOL) -> None:
    """Every task's loss and every adapter grad within ``tol`` of its isolated reference."""
    for name, (ref_loss, ref_grads) in refs.items():
        e = rel_err(losses[name], ref_loss)
        assert e <= tol, f"task {name}: loss {losses[name].item()} vs {ref_loss.item()} (rel {e:.2e})"
        got = grads_of(name)
        assert set(got) == set(ref_grads), f"task {name}: grads for {sorted(set(got) ^ set(ref_grads))[:4]}"
        assert ref_grads, f"task {name}: no reference grads"
        for pname, g in ref_grads.items():
            assert g.norm() > 0, f"task {name}: reference grad of {pname} is zero; test is vacuous"
            e = rel_err(got[pname], g)
            assert e <= tol, f"task {name}: grad {pname} rel err {e:.2e}"


def adapter_grads(model, adapter: str) -> dict[str, torch.Tensor]:
    """Grads of ``adapter``'s params, keyed like `isolated` (names of the active adapter)."""
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if f".{adapter}." in n + "." and p.grad is not None
    }


@dataclass
class Case:
    """A compiled program, its batches, and each task's isolated reference."""

    program: muxc.Program
    batches: dict
    refs: dict  # task -> (loss, grads) of the task alone
    grads: Callable[[str], dict]  # task -> its adapter grads now
    models: list

    def zero_grad(self) -> None:
        for m in self.models:
            m.zero_grad(set_to_none=True)

    def check(self, tol: float = REL_TOL, **options) -> muxc.Program:
        """Run the batches with ``options`` changed; assert every task matches its reference
        within ``tol``."""
        program = self.program.with_options(**options)
        self.zero_grad()
        losses = program.forward_backward(self.batches)
        assert_matches(losses, self.grads, self.refs, tol)
        self.zero_grad()
        return program


def separate(spec, batches, **options) -> Case:
    """Tasks ``[(name, model)]`` on separate models: references first, then one compile
    (``verify=True`` and ``options``)."""
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    models = dict(spec)
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec], muxc.Options(verify=True, **options))
    return Case(program, batches, refs, lambda n: adapter_grads(models[n], "default"), list(models.values()))


def cached(build: Callable[..., Case]) -> Callable[..., Case]:
    """``build`` memoised on its arguments, defaults filled in (``get("gpt2")`` and
    ``get("gpt2", "pad")`` are one case): a module fixture returning it compiles each case
    once, on first use."""
    import inspect

    made: dict[tuple, Case] = {}
    sig = inspect.signature(build)

    def get(*args, **kwargs) -> Case:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.items())
        if key not in made:
            made[key] = build(*args, **kwargs)
        return made[key]

    return get


def training_snapshot(program: muxc.Program) -> dict:
    """Every task's adapter values, grads, optimizer state and counters (cloned), for
    "nothing changed" checks: compare two with `same`."""
    import copy

    out = {}
    for name, st in program.states.items():
        out[name] = (
            [p.detach().clone() for p in st.params],
            [None if p.grad is None else p.grad.clone() for p in st.params],
            copy.deepcopy(st.optimizer.state_dict()),
            (st.steps, st.bad_steps, st.paused),
        )
    return out


def same(x, y) -> bool:
    """Bit-for-bit equality of nested tensors / dicts / lists / tuples / plain values (NaN
    tensors compare equal where both hold NaN)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num())
                and torch.equal(x.isnan(), y.isnan()))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(same, x, y))
    return x == y


def merged_graph(tasks, **options):
    """``(MuxGraph, CompileContext)``: ``tasks`` validated, traced, sharing one base and merged,
    as `merge_backbones` hands the graph to the passes after it (``options``: `muxc.Options`)."""
    from muxc.passes import (CompileContext, merge_backbones, share_frozen_weights, trace_tasks,
                             validate_tasks)

    ctx = CompileContext(muxc.Options(**options))
    graphs, _ = trace_tasks(validate_tasks(tasks, ctx).value, ctx).value
    graphs, _ = share_frozen_weights(graphs, ctx).value
    return merge_backbones(graphs, ctx).value, ctx


def saved_bytes(program, batches) -> int:
    """Bytes of the tensors autograd saves in one forward_backward (unique storages, weights
    and adapter parameters excluded)."""
    params = {t.untyped_storage().data_ptr() for t in program.mux.tensors.values()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        program.forward_backward(batches)
    return sum(saved.values())
