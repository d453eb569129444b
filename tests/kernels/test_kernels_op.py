"""The shared op plumbing: eager fast path vs the custom op under tracing; selection once."""

import torch

from muxc.kernels import Impl, _triton, multi_ia3, multi_lora, registry
from muxc.kernels.op import eager_calls
from muxc.kernels.registry import KernelImpl


class _Adapted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(2, 8)),
                                         torch.nn.Parameter(torch.randn(3, 8))])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(6, 2)),
                                         torch.nn.Parameter(torch.randn(6, 3))])
        self.v = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(6)) for _ in range(2)])

    def forward(self, x, h):
        y = multi_lora(x, [3, 2], list(self.a), list(self.b), [1.0, 0.5], base=h)
        return multi_ia3(y, [3, 2], list(self.v))


def test_eager_calls_skip_the_custom_op_and_match_it():
    m = _Adapted()
    x, h = torch.randn(5, 8), torch.randn(5, 6)
    before = eager_calls()
    out = m(x, h)
    out.sum().backward()
    assert eager_calls() - before == 2  # both ops took the eager autograd.Function path
    eager_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    via_op = torch.ops.muxc.multi_ia3(
        torch.ops.muxc.multi_lora(x, [3, 2], list(m.a), list(m.b), [1.0, 0.5], h, None),
        [3, 2], list(m.v), None)
    via_op.sum().backward()
    torch.testing.assert_close(out, via_op, rtol=0, atol=0)
    for eager, p in zip(eager_grads, m.parameters()):
        torch.testing.assert_close(p.grad, eager, rtol=0, atol=0)


def test_export_sees_one_opaque_node_per_op():
    m = _Adapted()
    before = eager_calls()
    ep = torch.export.export(m, (torch.randn(5, 8), torch.randn(5, 6)), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.muxc.multi_lora.default) == 1
    assert targets.count(torch.ops.muxc.multi_ia3.default) == 1
    assert eager_calls() == before  # fake tensors went through the custom ops
    x, h = torch.randn(5, 8), torch.randn(5, 6)
    torch.testing.assert_close(ep.module()(x, h), m(x, h))


def test_selection_runs_the_checkers_once(monkeypatch):
    calls = []
    impls = registry._REGISTRY["multi_lora"]
    real = impls[Impl.GROUPED]

    def counting_check(*tensors, forced):
        calls.append(forced)
        return real.check(*tensors, forced=forced)

    monkeypatch.setitem(impls, Impl.GROUPED, KernelImpl(op="multi_lora", impl=Impl.GROUPED,
                                                        fn=real.fn, check=counting_check))
    monkeypatch.setattr(registry, "_CHOICES", {})
    x = torch.randn(4, 8)
    a, b = [torch.randn(2, 8)], [torch.randn(3, 2)]
    for _ in range(3):
        multi_lora(x, [4], a, b, [1.0])
    assert calls == [False]
    choice = registry.select("multi_lora", None, x)
    assert choice.impl is Impl.GROUPED  # on cpu; the reason says why triton was passed over
    assert ("cuda only" if _triton.AVAILABLE else "not importable") in choice.reason
    for _ in range(2):
        multi_lora(x, [4], a, b, [1.0], impl="grouped")
    assert calls == [False, True]  # a forced request is its own cache entry, checked once
    multi_lora(x.double(), [4], [a[0].double()], [b[0].double()], [1.0])
    assert calls == [False, True, False]  # so is another dtype
