"""The shared Triton support: checker reasons, tuner keys and the interpreter config."""

import pytest
import torch

from muxc.errors import KernelUnavailableError
from muxc.kernels import _triton, multi_lora, registry
from muxc.kernels._triton import Config, Tuner
from muxc.kernels.lora import segments_for


def test_checker_reasons(device):
    assert _triton.check(torch.zeros(2, device=device), forced=True) is None
    why = _triton.check(torch.zeros(2, dtype=torch.float64, device=device), forced=True)
    assert "dtype torch.float64 is not supported" in why
    if device.type == "cpu":
        assert "force impl=\"triton\"" in _triton.check(torch.zeros(2), forced=False)


def test_forcing_triton_on_unsupported_dtype_says_why(device):
    x = torch.zeros(2, 4, dtype=torch.float64, device=device)
    a, b = [torch.zeros(1, 4, dtype=torch.float64, device=device)], [
        torch.zeros(3, 1, dtype=torch.float64, device=device)]
    with pytest.raises(KernelUnavailableError, match="float64 is not supported"):
        multi_lora(x, [2], a, b, [1.0], impl="triton")
    assert registry.select("multi_lora", None, x).impl.value == "grouped"


def test_tuner_key_and_interpreter_default(device):
    tuner = Tuner()
    segs = segments_for((100, 0, 30))
    key = tuner.key("lora_shrink", segs, 4096, 16, 16, torch.zeros(1, device=device))
    assert key[:7] == ("lora_shrink", 3, 256, 4096, 16, 16, "float32")
    default = Config(block_m=128, block_n=256, block_r=64)
    if device.type == "cpu":  # the interpreter never times candidates
        calls = []
        chosen = tuner.pick(key, [Config(16, 16)], default, calls.append, device, work=1 << 30)
        assert chosen is default
        assert calls == [] and tuner.report() == []


def test_config_fit_keeps_dot_tiles_at_least_16():
    assert Config(block_m=64, block_n=256, block_r=64).fit(32, 1) == Config(64, 32, 16)
    assert Config(block_m=64, block_n=64, block_r=16).fit(257, 64) == Config(64, 64, 16)


@pytest.mark.gpu
def test_tuner_times_candidates_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("autotuning times candidates on CUDA only")
    tuner = Tuner()
    segs = segments_for((64,))
    x = torch.zeros(64, 64, device=device)
    key = tuner.key("probe", segs, 64, 64, 0, x)
    cands = [Config(16, 16), Config(32, 32)]
    small = tuner.pick(key, cands, Config(64, 64), lambda cfg: x.add_(1), device, work=10)
    assert small == cands[0] and tuner.report() == []  # small problems are not timed
    chosen = tuner.pick(key, cands, Config(64, 64), lambda cfg: x.add_(1), device, work=1 << 30)
    assert chosen in cands and tuner.report()[0]["candidates"] == 2
