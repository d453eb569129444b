"""multi_ia3 through Triton (compiled on CUDA, interpreted on CPU) vs a float64 reference."""

import pytest
import torch
from kernel_cases import assert_close, params

from muxc.kernels import _triton, multi_ia3, registry
from muxc.kernels.ia3 import multi_ia3_bwd_ref, multi_ia3_ref
from muxc.kernels.lora import segments_for
from muxc.kernels.registry import Impl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("case, dtype", params(DTYPES))
def test_forward_backward_match_fp64_reference(case, dtype, device):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 is tested on GPU only (the interpreter's bf16 support is partial)")
    lens, _ = case.layout()
    g = torch.Generator().manual_seed(case.seed)
    h = torch.randn(case.tokens, case.n, generator=g).to(dtype).to(device).requires_grad_()
    vs = [(1 + torch.randn(case.n, generator=g)).to(dtype).to(device).requires_grad_()
          for _ in lens]
    before = _triton.launches()
    z = multi_ia3(h, lens, vs, impl="triton")
    dz = torch.randn(z.shape, generator=g).to(dtype).to(device)
    z.backward(dz)
    after = _triton.launches()
    # Triton ran: forward scale, backward scale (dh) and one segmented reduction (all dv_i).
    assert after.get("ia3_scale", 0) - before.get("ia3_scale", 0) == 2
    assert after.get("ia3_grad", 0) - before.get("ia3_grad", 0) == 1

    segs = segments_for(tuple(lens))
    h64, v64 = h.detach().cpu().double(), [v.detach().cpu().double() for v in vs]
    dh_ref, dv_ref = multi_ia3_bwd_ref(dz.cpu().double(), h64, segs, v64)
    assert_close("z", z.detach().cpu(), multi_ia3_ref(h64, segs, v64), dtype)
    assert_close("dh", h.grad.cpu(), dh_ref, dtype)
    for i, n in enumerate(lens):
        assert_close(f"dv[{i}] ({n} tokens)", vs[i].grad.cpu(), dv_ref[i], dtype)
        if n == 0:
            assert not vs[i].grad.any()


def test_auto_choice(device):
    h = torch.zeros(3, 4, device=device)
    choice = registry.select("multi_ia3", None, h)
    assert choice.impl is (Impl.TRITON if device.type == "cuda" else Impl.GROUPED)
    assert registry.select("multi_ia3_bwd", "triton", h).impl is Impl.TRITON
