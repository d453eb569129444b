"""The blocked frozen-LM-head loss (`muxc.kernels.lm_head_loss`) against the unfused reference,
in fp64 (the reference's fp32 upcast of the logits is what both compute in)."""

from __future__ import annotations

import pytest
import torch

from muxc.errors import KernelInputError
from muxc.kernels.lm_head_loss import IGNORE_INDEX, block_tokens, lm_head_loss, lm_head_loss_ref


def _case(rows, seq, hidden, vocab, seed, ignored):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    b = torch.randn(vocab, generator=gen)
    y = torch.randint(0, vocab, (rows, seq), generator=gen)
    y[torch.rand(rows, seq, generator=gen) < ignored] = IGNORE_INDEX
    return h, w, b, y


@pytest.mark.parametrize("rows,seq,block", [(1, 1, 1), (2, 7, 3), (3, 37, 8), (2, 16, 64), (1, 40, 40)])
@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(rows, seq, block, scale, bias):
    h, w, b, y = _case(rows, seq, 16, 50, seed=rows * 100 + seq, ignored=0.3)
    y.view(-1)[0] = 3  # at least one labelled token
    b = b if bias else None
    ref = lm_head_loss_ref(h, w, b, y, scale)
    (g_ref,) = torch.autograd.grad(ref * 1.7, h)
    out = lm_head_loss(h, w, b, y, scale, block=block)
    (g,) = torch.autograd.grad(out * 1.7, h)
    # fp32 logits in both; only the summation order differs
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_ignored_tokens_and_empty_blocks():
    h, w, _, y = _case(2, 12, 8, 20, seed=3, ignored=0.0)
    y[:, :8] = IGNORE_INDEX  # whole blocks of 4 without a label
    out = lm_head_loss(h, w, None, y, 0.5, block=4)
    (g,) = torch.autograd.grad(out, h)
    torch.testing.assert_close(out, lm_head_loss_ref(h, w, None, y, 0.5))
    assert torch.count_nonzero(g[:, :8]) == 0 and torch.count_nonzero(g[:, 8:]) > 0
    none = torch.full_like(y, IGNORE_INDEX)  # HF's mean over no label is nan; the sum 0
    assert torch.isnan(lm_head_loss(h, w, None, none, None)) == torch.isnan(lm_head_loss_ref(h, w, None, none, None))
    assert float(lm_head_loss(h, w, None, none, 0.5).detach()) == 0.0


def test_no_grad_keeps_nothing():
    h, w, _, y = _case(2, 5, 8, 20, seed=4, ignored=0.0)
    with torch.no_grad():
        out = lm_head_loss(h, w, None, y, None)
    assert out.grad_fn is None
    torch.testing.assert_close(out, lm_head_loss_ref(h.detach(), w, None, y, None))


def test_block_size_and_input_checks():
    assert block_tokens(32000) == 32 and block_tokens(10**9) == 1
    h, w, _, y = _case(2, 5, 8, 20, seed=5, ignored=0.0)
    with pytest.raises(KernelInputError, match="disagree on the token dimensions"):
        lm_head_loss(h, w, None, y[:, :4], None)
    with pytest.raises(KernelInputError, match="does not map hidden size 8"):
        lm_head_loss(h, w.t(), None, y, None)
    with pytest.raises(KernelInputError, match="must be frozen"):
        lm_head_loss(h, w.requires_grad_(), None, y, None)


def test_bf16_likely_labels_match_the_reference_error():
    """bf16 head, likely labels (p(label) ~ 0.96, so each label's logit gradient p - 1 is
    small): the fused op's error against fp64 stays that of the unfused bf16 reference (the
    normalisation and one-hot are applied in a different order from it), and unlabelled rows
    get no gradient."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(200, 32, generator=gen)
    h = torch.randn(64, 32, generator=gen)
    y = (h @ w.t()).argmax(-1)  # every label is the likeliest token: p(label) ~ 0.9
    y[::5] = IGNORE_INDEX
    h = h * 10

    def grad(fn, dtype):
        hh = h.to(dtype).requires_grad_()
        fn(hh, w.to(dtype), None, y, 0.1).backward()
        return hh.grad.double()

    exact = grad(lm_head_loss_ref, torch.float64)
    err_ref = (grad(lm_head_loss_ref, torch.bfloat16) - exact).norm() / exact.norm()
    err = (grad(lm_head_loss, torch.bfloat16) - exact).norm() / exact.norm()
    assert err <= 1.5 * err_ref, (float(err), float(err_ref))
    assert torch.count_nonzero(grad(lm_head_loss, torch.bfloat16)[::5]) == 0
