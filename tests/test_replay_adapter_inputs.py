"""`muxc.kernels.replay` and pass `replay_adapter_inputs`: an adapter kernel keeps the tensors its
input is made from (which their ops keep anyway) instead of the input, computes the input
again in backward bit for bit, and the program keeps less for backward while its losses and
grads still match isolated HF PEFT."""

from __future__ import annotations

import pytest
import torch
from helpers import merged_graph, saved_bytes, separate
from models import lora_and_ia3_tasks, make_batch, make_peft
from peft import LoraConfig

import muxc
import muxc.pipeline
from muxc.ir import Role, info
from muxc.kernels.replay import Replay, Slot, recipe_of
from muxc.kernels import multi_lora
from muxc.kernels.swiglu import swiglu
from muxc.passes import CompileContext, fuse_swiglu, replay_adapter_inputs

aten = torch.ops.aten

# the norm's output as HF's Llama writes it: w * (h * rsqrt(mean(h^2) + eps)), from h, r and w
NORM = Replay(((aten.mul.Tensor, (Slot(0), Slot(1)), {}),
               (aten.mul.Tensor, (Slot(2), Slot(3)), {})), (True, True, False), "norm")


def _norm(h, w):
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return NORM(w * (h * r), h, r, w), r


def test_a_recipe_only_where_keeping_the_roots_is_free():
    w = torch.randn(8)
    h = torch.randn(5, 8, requires_grad=True)
    x, r = _norm(h, w)
    recipe = recipe_of(x)
    assert recipe is not None and recipe.roots[0] is h and recipe.roots[2] is w
    assert torch.equal(recipe.compute(recipe.roots), x)  # bit for bit
    # an activation root without a gradient is not kept by its op: x is kept as before
    assert recipe_of(_norm(h.detach(), w)[0]) is None
    with torch.no_grad():
        assert recipe_of(_norm(h, w)[0]) is None


def _lora_step(mark: bool):
    torch.manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    a = [torch.randn(2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(4, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    x, _ = _norm(h, w) if mark else (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)),
                                     None)
    kept = []

    def pack(t):
        kept.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # two sites read x
        out = multi_lora(x, [4, 2], a, b, [0.5, 2.0], impl="torch")
        out2 = multi_lora(x, [4, 2], a[::-1], b[::-1], [1.0, 0.25], impl="torch")
    (out.pow(2).sum() + out2.pow(3).sum()).backward()
    return x, h, kept, [t.grad for t in (h, *a, *b)]


def test_lora_kernel_keeps_the_roots_and_replays_the_input_bitwise(monkeypatch):
    x0, _, kept0, grads0 = _lora_step(mark=False)
    runs = []
    run = Replay.run
    monkeypatch.setattr(Replay, "run", lambda self, roots: runs.append(self) or run(self, roots))
    x1, h1, kept1, grads1 = _lora_step(mark=True)
    assert recipe_of(x1) is not None and recipe_of(x1).shared.value is None  # dropped after use
    assert runs == [NORM]  # the second site's backward reused the first one's replay
    assert x0.untyped_storage().data_ptr() in kept0  # unmarked: the kernel keeps its input
    assert x1.untyped_storage().data_ptr() not in kept1  # marked: its roots instead
    assert h1.untyped_storage().data_ptr() in kept1
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads0, grads1))


def test_each_replay_runs_once_per_step_for_all_its_sites(llama, monkeypatch):
    model = make_peft(llama, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 2)
    program = muxc.compile([muxc.Task(name="a", model=model)])
    replays = [n for n in program.mux.gm.graph.nodes if isinstance(n.target, Replay)]
    runs = []
    run = Replay.run
    monkeypatch.setattr(Replay, "run", lambda self, roots: runs.append(self) or run(self, roots))
    program.forward_backward({"a": make_batch(2, 12, 3)})
    # per layer: q, k, v read one norm output, gate and up the other, down the MLP product
    assert sum(len(n.users) for n in replays) == 6 * llama.config.num_hidden_layers
    # each once; layer 0's input norm reads the embeddings, which need no gradient: its
    # adapters keep their input (no recipe, nothing replayed)
    assert sorted(map(id, runs)) == sorted(id(n.target) for n in replays[1:])


@pytest.fixture(scope="module")
def fused(llama):
    merged, ctx = merged_graph(lora_and_ia3_tasks(llama))
    return fuse_swiglu(merged, ctx).value


def test_pass_puts_a_replay_before_the_sites_of_norm_outputs_and_the_mlp_product(llama, fused):
    layers = llama.config.num_hidden_layers
    result = replay_adapter_inputs(fused, CompileContext(muxc.Options()))
    replays = [n for n in result.value.gm.graph.nodes if isinstance(n.target, Replay)]
    labels = [n.target.label for n in replays]
    # per layer: both norms' outputs (mul, cast, mul by the weight) and swiglu's product
    assert len(replays) == 3 * layers, labels
    assert sum(1 for n in replays if n.args[0].target is swiglu) == layers
    for n in replays:
        assert n.users and all(info(u).role is Role.ADAPTER and u.args[0] is n for u in n.users)
        assert n.meta["val"] is n.args[0].meta["val"]
        if n.args[0].target is not swiglu:
            assert [s[0] for s in n.target.steps] == [aten.mul.Tensor, aten.to.dtype,
                                                      aten.mul.Tensor]
    assert f"{3 * layers} adapter input(s) computed again" in result.notes
    assert not any(isinstance(n.target, Replay) for n in fused.gm.graph.nodes)  # not mutated


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_program_keeps_less_and_matches_isolated_hf(bases, family, monkeypatch):
    base = bases(family)
    spec = [("a", make_peft(base, LoraConfig(r=4, target_modules="all-linear",
                                             lora_dropout=0.0), 1))]
    batches = {"a": make_batch(2, 12, 1, pad_rows=1)}
    case = separate(spec, batches)
    history = {r.name: r.summary for r in case.program.history}
    assert "computed again in backward" in history["replay_adapter_inputs"]
    case.check(tol=1e-5)
    monkeypatch.setattr(muxc.pipeline, "PIPELINE", tuple(
        p for p in muxc.pipeline.PIPELINE if p.fn is not replay_adapter_inputs))
    keeping = muxc.compile([muxc.Task(name="a", model=spec[0][1])])
    with_replay, without = saved_bytes(case.program, batches), saved_bytes(keeping, batches)
    case.zero_grad()
    # at least each layer's MLP product (Llama: silu(gate) * up; GPT-2: gelu's product)
    cfg = base.config
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    tokens = batches["a"]["input_ids"].numel()
    assert without - with_replay >= tokens * inter * 4 * cfg.num_hidden_layers
