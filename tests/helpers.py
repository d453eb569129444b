"""Isolated-PEFT references and comparisons for equivalence tests."""

from __future__ import annotations

import torch

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


def assert_matches(losses, grads_of, refs) -> None:
    """Every task's loss and every adapter grad within REL_TOL of its isolated reference."""
    for name, (ref_loss, ref_grads) in refs.items():
        e = rel_err(losses[name], ref_loss)
        assert e <= REL_TOL, f"task {name}: loss {losses[name].item()} vs {ref_loss.item()} (rel {e:.2e})"
        got = grads_of(name)
        assert set(got) == set(ref_grads), f"task {name}: grads for {sorted(set(got) ^ set(ref_grads))[:4]}"
        assert ref_grads, f"task {name}: no reference grads"
        for pname, g in ref_grads.items():
            assert g.norm() > 0, f"task {name}: reference grad of {pname} is zero; test is vacuous"
            e = rel_err(got[pname], g)
            assert e <= REL_TOL, f"task {name}: grad {pname} rel err {e:.2e}"


def adapter_grads(model, adapter: str) -> dict[str, torch.Tensor]:
    """Grads of ``adapter``'s params, keyed like `isolated` (names of the active adapter)."""
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if f".{adapter}." in n + "." and p.grad is not None
    }
