"""Equivalence on each device: on CUDA (real Triton kernels, chunk attention) every task's loss
and adapter grads equal isolated HF PEFT run on the same device. The CPU case keeps the test
itself exercised where there is no GPU; the CUDA cases skip without one."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

NO_CUDA = "needs a CUDA device"
CASES = [
    pytest.param("cpu", "chunk", id="cpu-chunk", marks=pytest.mark.slow),  # = test_chunks on CPU
    *(pytest.param("cuda", alignment, id=f"cuda-{alignment}",
                   marks=[pytest.mark.gpu,
                          pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])
      for alignment in ("pad", "chunk")),
]


@pytest.mark.parametrize(("device", "alignment"), CASES)
def test_mixed_adapters_match_isolated_peft_on_device(bases, device, alignment):
    from muxc.kernels import _triton

    base = copy.deepcopy(bases("llama")).to(device)
    lora4 = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    lora16 = LoraConfig(r=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0)
    spec = [("lora", make_peft(base, lora4, 1)), ("lora16", make_peft(base, lora16, 2)),
            ("ia3", make_peft(base, IA3Config(), 3))]
    batches = {name: {k: v.to(device) for k, v in make_batch(rows, seq, seed).items()}
               for name, rows, seq, seed in (("lora", 2, 7, 1), ("lora16", 1, 11, 2),
                                             ("ia3", 3, 4, 3))}
    refs = {name: isolated(model, batches[name]) for name, model in spec}
    tasks = [muxc.Task(name=name, model=model) for name, model in spec]
    program = muxc.compile(tasks, muxc.Options(fusion="auto", alignment=alignment, verify=True))
    before = sum(_triton.launches().values())
    losses = program.forward_backward(batches)
    assert {loss.device.type for loss in losses.values()} == {device}
    models = dict(spec)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)
    if device == "cuda":  # the registry's default on CUDA: the compiled Triton kernels
        assert sum(_triton.launches().values()) > before
