"""Activation recomputation: HF gradient checkpointing honoured, each recompute mode exact
against isolated HF PEFT, and the memory model against the bytes each mode really keeps."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import adapter_grads, assert_matches, isolated
from models import VOCAB, make_batch, make_peft
from peft import LoraConfig

import muxc
import muxc.ir.recompute as rc
from muxc.errors import OptionsError
from muxc.ir.recompute import CheckpointedLayer, Recompute, recomputed_layers
from muxc.plan import estimate_memory

MODES = ("none", "layers", "auto")


def _lora(rank: int, targets) -> LoraConfig:
    return LoraConfig(r=rank, target_modules=targets, lora_dropout=0.0)


def _compile(models, **options) -> muxc.Program:
    """Compiled without pass verification: recompute is decided after the passes' outputs are
    checked by the other suites, and verification would dominate this file's time."""
    tasks = [muxc.Task(name=n, model=m) for n, m in models.items()]
    return muxc.compile(tasks, muxc.Options(**options))


def _runnable_modules(program) -> list:
    ex = program.executor
    return [ex.mux.gm] if ex.partitioned is None else [s.module for s in ex.partitioned.stages]


def _count_layer_runs(program) -> dict[int, int]:
    """Hooks counting how often each recomputed layer's ops run (forward + replays)."""
    runs: dict[int, int] = {}
    for gm in _runnable_modules(program):
        for mod in gm.children():
            if isinstance(mod, CheckpointedLayer):
                def counted(*args, _run=mod.inner.forward, _layer=mod.layer):
                    runs[_layer] = runs.get(_layer, 0) + 1
                    return _run(*args)
                mod.inner.forward = counted  # (module hooks do not fire in the replay)
    return runs


def _check(program, models, batches, refs) -> None:
    for m in models.values():
        m.zero_grad(set_to_none=True)
    losses = program.forward_backward(batches)
    assert_matches(losses, lambda n: adapter_grads(models[n], "default"), refs)
    for m in models.values():
        m.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------- HF checkpointing


@pytest.mark.parametrize("reentrant,every_n,layers", [(False, 1, [0, 1]), (True, 2, [0])])
def test_gradient_checkpointing_is_honoured_per_layer(llama, reentrant, every_n, layers):
    """A model with ``gradient_checkpointing_enable()`` (either checkpoint form; HF's
    ``every_n_layers`` picks the layers) compiles to recompute='layers': each checkpointed
    decoder layer runs again in backward, results stay exact, and the user's model keeps its
    checkpointing."""
    model = make_peft(llama, _lora(4, ["q_proj", "v_proj"]), 1)
    hf = model.get_base_model()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant},
                                     every_n_layers=every_n)
    batch = make_batch(2, 10, 3)
    ref = isolated(model, batch)
    program = _compile({"a": model})
    assert program.recompute.mode is Recompute.LAYERS
    assert "gradient checkpointing" in program.recompute.why
    assert program.recompute.layers in (frozenset(layers), None if every_n == 1 else ())
    assert recomputed_layers(program.executor.mux.gm) == layers
    runs = _count_layer_runs(program)
    _check(program, {"a": model}, {"a": batch}, {"a": ref})
    assert runs == {n: 2 for n in layers}, runs  # forward, then once more in backward
    assert hf.is_gradient_checkpointing  # switched off only while tracing
    if reentrant:  # an explicit option overrides the models, and the compile history says so
        off = _compile({"a": model}, recompute="none")
        assert off.recompute.mode is Recompute.NONE
        assert off.executor.mux.gm is off.mux.gm
        note = next(r.summary for r in off.history if r.name == "plan_recompute")
        assert "overridden by the option" in note


def test_recompute_option_is_validated_and_compile_time(programs):
    with pytest.raises(OptionsError, match="recompute='sometimes' is not one of"):
        muxc.Options(recompute="sometimes")
    program = programs.compiled[("none", "pad")]
    assert program.recompute.mode is Recompute.NONE
    with pytest.raises(OptionsError, match="compile-time"):
        program.with_options(recompute="layers")


# ----------------------------------------------------------------------- equivalence


def _bigger_llama() -> torch.nn.Module:
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


class _Programs:
    """Two LoRA tasks (q,v rank 4; every linear rank 8) on a 3-layer Llama, their batches and
    isolated references, and one program per (mode, alignment) case, compiled on first use
    and shared by every test of this module (recompute is compile-time: one compile each)."""

    def __init__(self):
        base = _bigger_llama()
        self.models = {"a": make_peft(base, _lora(4, ["q_proj", "v_proj"]), 1),
                       "b": make_peft(base, _lora(8, "all-linear"), 2)}
        self.batches = {"a": make_batch(2, 12, 0), "b": make_batch(3, 9, 1)}
        self.refs = {n: isolated(m, self.batches[n]) for n, m in self.models.items()}
        self.compiled: dict[tuple[str, str], muxc.Program] = _LazyPrograms(self.models)


class _LazyPrograms(dict):
    def __init__(self, models):
        super().__init__()
        self.models = models

    def __missing__(self, key):
        mode, alignment = key
        extra = {}
        if alignment == "chunk":  # 3 chunk steps; 'layers' also cut across 2 pipeline stages
            extra = {"chunk_size": 4, **({"stages": 2} if mode == "layers" else {})}
        self[key] = _compile(self.models, recompute=mode, alignment=alignment, **extra)
        return self[key]


@pytest.fixture(scope="module")
def programs() -> _Programs:
    return _Programs()


@pytest.mark.parametrize("mode,alignment", [pytest.param("layers", "pad", marks=pytest.mark.slow),
                                            ("layers", "chunk"), ("auto", "pad"),
                                            pytest.param("auto", "chunk", marks=pytest.mark.slow)])
def test_each_mode_is_exact(programs, mode, alignment):
    """Loss and adapter grads of two fused tasks equal isolated HF PEFT under each recompute
    mode, spatially and temporally fused; with chunks the replays read the K/V kept by earlier
    chunks exactly as the first run did (3 chunk steps here), and with 'layers' the stage
    boundary cuts a layer in two: each stage recomputes its part."""
    program = programs.compiled[(mode, alignment)]
    runs = _count_layer_runs(program)
    for fusion in ("spatial", "temporal"):
        _check(program.with_options(fusion=fusion), programs.models, programs.batches,
               programs.refs)
    assert set(runs) == {0, 1, 2} and all(n >= 4 for n in runs.values()), runs
    if program.options.stages == 2:
        layers = [recomputed_layers(m) for m in _runnable_modules(program)]
        assert len(layers) == 2 and all(layers), layers
    if mode == "auto":  # the cost model kept some attention outputs, not every GEMM output
        keep = program.recompute.keep
        assert keep and len(keep) < len(program.planner.summary.keepable), program.recompute


# ----------------------------------------------------------------------- memory model

MEMORY_TOLERANCE = 0.05  # relative; the model counts storages exactly, the rest is rounding


def _kept_bytes(program, batches) -> int:
    """Bytes kept from forward to backward in one step (unique storages, weights and adapter
    parameters excluded): what autograd saves outside recomputed layers (saved-tensor hooks),
    each recomputed layer's inputs, and what selective checkpointing caches per layer."""
    params = {t.untyped_storage().data_ptr() for t in program.mux.tensors.values()}
    kept: dict[int, int] = {}

    def keep(t) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                kept[st.data_ptr()] = st.nbytes()

    contexts = []
    real = rc._auto_context

    def spy():
        ctx = real()
        contexts.append(ctx[0])
        return ctx

    def after_layer(mod, args, out):
        for a in args:
            keep(a)
        for mode in contexts:  # outputs cached by selective checkpointing in this layer
            for by_index in mode.storage.values():
                for cached in by_index.values():
                    for leaf in torch.utils._pytree.tree_leaves(cached):
                        keep(getattr(leaf, "val", None))
        contexts.clear()

    handles = [m.register_forward_hook(after_layer) for gm in _runnable_modules(program)
               for m in gm.children() if isinstance(m, CheckpointedLayer)]
    rc._auto_context = spy
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (keep(t), t)[1], lambda t: t):
            program.forward_backward(batches)
    finally:
        rc._auto_context = real
        for h in handles:
            h.remove()
    return sum(kept.values())


def test_memory_model_counts_what_each_mode_keeps(programs):
    """The planner's activation bytes (without the recompute peak) equal the bytes each mode
    keeps for backward, measured; recomputing keeps less, and 'layers' least."""
    models = programs.models
    rows, seq = 2, 64
    batches = {n: make_batch(rows, seq, i, pad_rows=0) for i, n in enumerate(models)}
    kept = {}
    for mode in MODES:
        program = programs.compiled[(mode, "pad")]
        summary = program.planner.summary
        est = estimate_memory(summary, {n: rows * seq for n in models}, seq_len=seq)
        peak = summary.recompute_peak(2 * rows, seq)
        assert (peak > 0) == (mode != "none"), (mode, peak)
        measured = _kept_bytes(program, batches)
        kept[mode] = measured
        assert est.activations - peak == pytest.approx(measured, rel=MEMORY_TOLERANCE), mode
    assert kept["layers"] < kept["auto"] < kept["none"], kept
