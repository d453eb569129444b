"""Structure: fused programs run each frozen GEMM once for all tasks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from models import make_batch, make_peft
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode

import muxc
from muxc.frontends import trace_task
from muxc.ir import LMHeadLoss, Role

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.linear.default}


class _CountFrozenMatmuls(TorchDispatchMode):
    """Counts matmuls with a frozen base weight as an operand (forward and input-grad GEMMs)."""

    def __init__(self, frozen_ptrs: set[int]):
        super().__init__()
        self.frozen = frozen_ptrs
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if ptrs & self.frozen:
                self.count += 1
        return func(*args, **(kwargs or {}))


def _count(program, batches, min_dim):
    """Frozen-weight GEMMs of one forward/backward, the LM head's left out: fused with each
    task's loss (`LMHeadLoss`), it runs on each task's own rows in token blocks, the same
    FLOPs as one call over all rows (its equivalence tests are in test_fuse_lm_head_loss)."""
    mux = program.mux
    frozen = {mux.tensors[n.name] for n in mux.nodes_with(Role.FROZEN)}
    head = {id(mux.tensors[n.args[2].name]) for n in mux.nodes_with(Role.LOSS)
            if isinstance(n.target, LMHeadLoss)}
    assert head, "the frozen LM head is fused with the losses"
    ptrs = {t.untyped_storage().data_ptr() for t in frozen
            if t.dim() == 2 and min(t.shape) >= min_dim and id(t) not in head}
    mode = _CountFrozenMatmuls(ptrs)
    with mode:
        program.forward_backward(batches)
    return mode.count


@pytest.fixture(scope="module")
def four(llama):
    """Four LoRA tasks of different ranks on separate copies of the base, compiled spatially,
    and the first of them compiled alone; the base weights' addresses before compiling."""
    ranks = [2, 4, 8, 4]
    models = [make_peft(llama, LoraConfig(r=r, target_modules="all-linear", lora_dropout=0.0), i)
              for i, r in enumerate(ranks)]
    up = [m.get_base_model().model.layers[0].mlp.up_proj.weight for m in models]
    ptrs = [w.data_ptr() for w in up]
    tasks = [muxc.Task(name=f"t{i}", model=m) for i, m in enumerate(models)]
    one = muxc.compile(tasks[:1], muxc.Options(fusion="spatial"))
    program = muxc.compile(tasks, muxc.Options(fusion="spatial"))
    return SimpleNamespace(program=program, one=one, models=models, up=up, ptrs=ptrs)


def test_frozen_matmuls_do_not_grow_with_tasks(llama, four):
    hidden = llama.config.hidden_size
    batch = {f"t{i}": make_batch(2, 6, i) for i in range(4)}
    n1 = _count(four.one, {"t0": batch["t0"]}, hidden)
    n4 = _count(four.program, batch, hidden)
    assert n1 > 0
    assert n4 == n1, f"frozen GEMMs: {n1} for 1 task, {n4} for 4 tasks"
    temporal = four.program.with_options(fusion="temporal")
    assert _count(temporal, batch, hidden) == 4 * n1  # temporal runs the backbone per task
    for m in four.models:
        m.zero_grad(set_to_none=True)


def test_merged_graph_has_one_site_per_adapted_op_and_one_loss_per_task(llama):
    models = [make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), 1),
              make_peft(llama, LoraConfig(r=2, target_modules=["v_proj", "o_proj"], lora_dropout=0.0), 2)]
    program = muxc.compile([muxc.Task(name=f"t{i}", model=m) for i, m in enumerate(models)])
    mux = program.mux
    layers = llama.config.num_hidden_layers
    assert len(mux.nodes_with(Role.ADAPTER)) == 3 * layers  # q, v (shared by both), o
    assert len(mux.nodes_with(Role.LOSS)) == 2
    shared_v = [recs for site, recs in mux.sites.items() if site.endswith("v_proj")]
    assert all([r.task for r in recs] == ["t0", "t1"] for recs in shared_v)
    # one copy of each frozen weight, bound to the first task's tensors
    frozen = [mux.tensors[n.name] for n in mux.nodes_with(Role.FROZEN)]
    assert len({id(t) for t in frozen}) == len(frozen)
    # the backbone ops of t0's own export: every node but placeholders, output and its adapters
    g0 = trace_task(muxc.Task(name="t0", model=models[0])).gm.graph
    n_placeholders = len(g0.find_nodes(op="placeholder"))
    # less the LM head's linear, fused into each task's loss (fuse_lm_head_loss), each
    # layer's two K/V head repeats (slice, unsqueeze, slice, expand, reshape; native_gqa) and
    # its silu + mul, one swiglu node (fuse_swiglu); plus a Replay node per layer before the
    # q/v sites reading the input norm's output (replay_adapter_inputs)
    repeats, swiglu, replays = 2 * layers * 5, layers, layers
    assert len(mux.nodes_with(Role.BACKBONE)) == (len(g0.nodes) - n_placeholders - 1 - 2 * layers - 1
                                                  - repeats - swiglu + replays)
    t1_sites = [r.site.rsplit(".", 1)[1] for r in mux.adapters["t1"]]
    assert t1_sites == ["v_proj", "o_proj"] * layers


def test_separate_models_share_one_base_copy(four):
    assert len(set(four.ptrs)) == 4  # four copies before compiling
    assert len({w.data_ptr() for w in four.up}) == 1  # duplicates now alias the shared copy
    report = four.program.explain()
    assert report.shared_by_value == report.frozen_tensors
    assert report.memory_ratio > 2.5
