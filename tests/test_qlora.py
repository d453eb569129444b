"""QLoRA: tasks on a bitsandbytes-quantized base (4-bit NF4/FP4 with and without double
quantization, 8-bit LLM.int8) share ONE quantized copy, run every quantized linear through
bitsandbytes' own kernels as one frozen op, and each task's loss and adapter grads equal
isolated HF PEFT on its own quantized model (fp32 compute dtype, rel 1e-4).

Bases are tiny random checkpoints saved once per module and loaded with
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``, as users load them.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import adapter_grads, assert_matches, isolated
from models import build_base, make_batch, perturb

import muxc

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")

from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from muxc.ir.quant import QUANT_LINEARS, linear_4bit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
# (attention, feed-forward) linears per family: LoRA on both, IA3 with the feed-forward one
TARGETS = {"llama": (["q_proj", "v_proj"], ["down_proj"]), "opt": (["q_proj", "v_proj"], ["fc2"])}
QUANT_OPS = {torch.ops.muxc.linear_4bit.default, torch.ops.muxc.linear_8bit.default}


@pytest.fixture(scope="module", autouse=True)
def _quiet_bnb():
    """bitsandbytes logs a cast warning on every 8-bit matmul in fp32."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory of a tiny random fp32 checkpoint (saved once per module)."""
    out = {}
    for family in TARGETS:
        path = tmp_path_factory.mktemp(f"ckpt-{family}")
        build_base(family).save_pretrained(path)
        out[family] = path
    return out


def load(path, quant: str | None):
    """The checkpoint as users load it: quantized by bitsandbytes (fp32 compute) or plain fp32."""
    qc = None
    if quant is not None:
        extra = {"bnb_4bit_compute_dtype": torch.float32} if "load_in_4bit" in QUANT[quant] else {}
        qc = BitsAndBytesConfig(**QUANT[quant], **extra)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map=DEVICE,
                                                dtype=torch.float32)


def peft(path, quant, config, seed):
    pm = get_peft_model(load(path, quant), config)
    perturb(pm, seed)
    return pm.train()  # bitsandbytes repacks 4-bit weights for CPU inference in eval mode


def lora(family, r=4):
    attn, ff = TARGETS[family]
    return LoraConfig(r=r, lora_alpha=8, target_modules=attn + ff, lora_dropout=0.0)


def ia3(family):
    attn, ff = TARGETS[family]
    return IA3Config(target_modules=["k_proj", *ff], feedforward_modules=ff)


def batches_for(names):
    shapes = {0: (2, 7), 1: (1, 9), 2: (3, 5)}
    return {n: {k: v.to(DEVICE) for k, v in make_batch(*shapes[i], seed=i + 1).items()}
            for i, n in enumerate(names)}


def quantized_modules(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


class QCase:
    """Three tasks on separately loaded copies of one quantized checkpoint: two LoRA tasks of
    equal structure (the second re-binds the first's export) and one IA3 task."""

    def __init__(self, path, family, quant, alignment="chunk"):
        self.spec = [("a", peft(path, quant, lora(family), 1)),
                     ("b", peft(path, quant, lora(family), 2)),
                     ("c", peft(path, quant, ia3(family), 3))]
        self.models = dict(self.spec)
        self.batches = batches_for(self.models)
        self.refs = {n: isolated(m, self.batches[n]) for n, m in self.spec}
        tasks = [muxc.Task(name=n, model=m) for n, m in self.spec]
        self.program = muxc.compile(tasks, muxc.Options(alignment=alignment, verify=True))

    def check(self, **options):
        program = self.program.with_options(**options)
        for m in self.models.values():
            m.zero_grad(set_to_none=True)
        losses = program.forward_backward(self.batches)
        assert_matches(losses, lambda n: adapter_grads(self.models[n], "default"), self.refs)
        for m in self.models.values():
            m.zero_grad(set_to_none=True)


CASES = [
    pytest.param("llama", "nf4", "chunk", id="llama-nf4-chunk"),
    pytest.param("llama", "fp4-dq", "pad", id="llama-fp4-dq-pad", marks=pytest.mark.slow),
    pytest.param("opt", "nf4-dq", "chunk", id="opt-nf4-dq-chunk", marks=pytest.mark.slow),
    pytest.param("opt", "int8", "pad", id="opt-int8-pad"),
    *(pytest.param(f, q, a, id=f"{f}-{q}-{a}", marks=pytest.mark.slow)
      for f, q, a in (("llama", "int8", "chunk"), ("llama", "nf4-dq", "pad"),
                      ("llama", "fp4", "chunk"), ("opt", "nf4", "pad"), ("opt", "fp4", "chunk"),
                      ("opt", "fp4-dq", "pad"))),
]


@pytest.fixture(scope="module")
def cases(checkpoints):
    """(family, quant, alignment) -> its `QCase`, built once per module."""
    made = {}

    def get(family, quant, alignment):
        key = (family, quant, alignment)
        if key not in made:
            made[key] = QCase(checkpoints[family], family, quant, alignment)
        return made[key]

    return get


@pytest.mark.parametrize(("family", "quant", "alignment"), CASES)
def test_qlora_tasks_match_isolated_peft_on_one_shared_quantized_base(
    cases, family, quant, alignment
):
    case = cases(family, quant, alignment)
    for fusion in ("spatial", "temporal", "auto"):
        case.check(fusion=fusion)
    program = case.program
    # one quantized op per quantized layer, run once for all tasks; no fp GEMM stands in for it
    first = case.models["a"]
    layers = quantized_modules(first)
    assert layers
    ops = [n for n in program.mux.gm.graph.nodes if n.target in QUANT_OPS]
    assert len(ops) == len(layers)
    assert all(packet in QUANT_LINEARS for packet in {n.target.overloadpacket for n in ops})
    # ONE copy: every task's quantized weights and quantization state are the shared tensors
    shared = {t.untyped_storage().data_ptr() for t in program.mux.tensors.values()}
    assert any(k.endswith("quant_absmax") or k.endswith("quant_scb") for k in program.sharing)
    for name, model in case.models.items():
        for mod in quantized_modules(model):
            assert mod.weight.untyped_storage().data_ptr() in shared, name
            if isinstance(mod, bnb.nn.Linear4bit):
                qs = mod.weight.quant_state
                nested = [qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else []
                state = [qs.absmax, *nested]
            else:
                state = [mod.state.SCB if mod.state.SCB is not None else mod.weight.SCB]
            assert all(t.untyped_storage().data_ptr() in shared for t in state), name
    assert program.sharing["model.decoder.layers.0.fc2.weight" if family == "opt"
                           else "model.layers.0.mlp.down_proj.weight"] == "value"
    # task b re-used a's export (a's and c's come from the process-wide template store when an
    # earlier compile of this process exported their structures)
    summary = program.history[1].summary
    exported, rebound = map(int, re.match(r"(\d+) exported, (\d+) re-bound", summary).groups())
    assert exported <= 2 and exported + rebound == 3
    assert summary.count("export of 'a'") == 1  # b's graph (c has another structure)
    # compile left the models as they were: no lifted buffers, no patched forwards
    for mod in layers:
        assert "forward" not in vars(mod) and not any(k.startswith("quant_") for k in mod._buffers)


@pytest.fixture(scope="module")
def nf4_llama(cases):
    return cases("llama", "nf4", "chunk")


def test_training_steps_match_isolated_qlora(checkpoints, nf4_llama):
    """Two optimizer steps (each task's default AdamW, lr 1e-3): every adapter stays equal to
    its model trained alone. Trains the shared case's adapters: runs after its equivalence."""
    path = checkpoints["llama"]
    twins = {n: peft(path, "nf4", lora("llama") if n != "c" else ia3("llama"), s)
             for n, s in (("a", 1), ("b", 2), ("c", 3))}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for n, m in twins.items()}
    program = nf4_llama.program.with_options(fusion="spatial")
    for _ in range(2):
        program.step(nf4_llama.batches)
        for n, m in twins.items():
            m(**nf4_llama.batches[n]).loss.backward()
            opts[n].step()
            opts[n].zero_grad()
    for n, m in twins.items():
        mine = dict(nf4_llama.models[n].named_parameters())
        for pname, p in m.named_parameters():
            if p.requires_grad:
                err = (mine[pname] - p).norm() / p.norm()
                assert err < 1e-4, (n, pname, err.item())


def test_cost_model_prices_quantized_linears_as_frozen_gemms(checkpoints, nf4_llama):
    """The summary prices each quantized linear as a GEMM (k -> n) that saves no activation:
    the same saved bytes and GEMM shapes as the fp base, with the quantized weight bytes."""
    from muxc.plan import OpKind
    from muxc.plan.summary import summarize_graph

    fp = muxc.compile([muxc.Task(name=n, model=get_peft_model(load(checkpoints["llama"], None),
                                                             cfg)) for n, cfg in
                       (("a", lora("llama")), ("b", lora("llama")), ("c", ia3("llama")))])
    q_sum, fp_sum = summarize_graph(nf4_llama.program.mux), summarize_graph(fp.mux)
    gemm = OpKind.GEMM

    def gemms(s):
        return sorted(o.forward.key.shape for o in s.ops
                      if o.forward is not None and o.forward.key.kind is gemm)

    assert gemms(q_sum) == gemms(fp_sum)
    assert len(gemms(q_sum)) == len(quantized_modules(nf4_llama.models["a"])) + 1  # + lm_head
    assert q_sum.saved(4, 16) == fp_sum.saved(4, 16)
    assert q_sum.frozen_bytes < fp_sum.frozen_bytes


def test_quantized_op_backward_saves_only_frozen_tensors(checkpoints, nf4_llama):
    mod = quantized_modules(nf4_llama.models["a"])[0]
    qs = mod.weight.quant_state
    x = torch.randn(3, 5, qs.shape[1], device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear_4bit(x, mod.weight, None, qs.absmax, None, None, None, list(qs.shape),
                        qs.blocksize, qs.quant_type, 0, qs.dtype, torch.float32)
    frozen = {mod.weight.untyped_storage().data_ptr(), qs.absmax.untyped_storage().data_ptr()}
    assert saved and {t.untyped_storage().data_ptr() for t in saved if t is not None} <= frozen
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = bnb.matmul_4bit(ref_x, mod.weight, quant_state=qs)
    (ref_dx,) = torch.autograd.grad(ref.square().sum(), ref_x)
    assert torch.equal(y, ref) and torch.allclose(dx, ref_dx, rtol=1e-6, atol=1e-7)


def test_quantized_and_fp_bases_do_not_mix(checkpoints, tmp_path):
    path = checkpoints["llama"]
    q = peft(path, "nf4", lora("llama"), 1)
    fp = get_peft_model(load(path, None), lora("llama"))
    with pytest.raises(muxc.ArchitectureMismatchError,
                       match=r"'q' and 'fp' .* 'model.layers.0.self_attn.q_proj' is nf4 \(block 64\) "
                             "vs not quantized"):
        muxc.compile([muxc.Task(name="q", model=q), muxc.Task(name="fp", model=fp)])
    fp4 = peft(path, "fp4-dq", lora("llama"), 2)
    with pytest.raises(muxc.ArchitectureMismatchError,
                       match=r"nf4 \(block 64\) vs fp4 \(block 64, double quantization"):
        muxc.compile([muxc.Task(name="nf4", model=q), muxc.Task(name="fp4", model=fp4)])
    # same config, different weights: compared by value like an fp base
    other = tmp_path / "other"
    build_base("llama", seed=5).save_pretrained(other)
    with pytest.raises(muxc.BaseWeightMismatchError, match="differs between tasks 'a' and 'b'"):
        muxc.compile([muxc.Task(name="a", model=q),
                      muxc.Task(name="b", model=peft(other, "nf4", lora("llama"), 3))])


def test_weights_repacked_for_cpu_inference_are_refused(checkpoints):
    model = peft(checkpoints["llama"], "nf4", lora("llama"), 1)
    qs = quantized_modules(model)[0].weight.quant_state
    qs.packing_format_for_cpu = True  # what an eval-mode forward does on an AVX512-BF16 CPU
    with pytest.raises(muxc.UnsupportedPeftError, match="repacked for CPU inference"):
        muxc.compile([muxc.Task(name="a", model=model)])
