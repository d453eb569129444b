"""Cost model: latency fit, profile cache, roofline, step time and memory vs measurements."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch
import transformers as T
from helpers import saved_bytes
from models import CORE_FAMILIES, VOCAB, lengths_batch, make_batch, make_peft
from peft import LoraConfig

import muxc
from muxc.ir import Role
from muxc.plan import (
    AdapterSpec,
    Clock,
    CostModel,
    CostModelError,
    DeviceProfile,
    LatencyModel,
    OpKey,
    OpKind,
    Roofline,
    Sample,
    StepShape,
    bubble_fraction,
    estimate_memory,
    estimate_step,
    fit_latency,
    load_or_profile,
    pipeline_iteration_time,
    profile_device,
    saturation_tokens,
    summarize_config,
    summarize_graph,
)
from muxc.plan.isolated import profile_in_child
from muxc.plan.profile import device_identity

STEP_TOLERANCE = 0.30  # the bar for predicted vs measured step time on this CPU
# (rows per task, seq) for 2 tasks: 256, 1024 and 2048 tokens per step
STEP_SHAPES = ((1, 128), (2, 256), (4, 256))
ADAPTERS = {"t0": AdapterSpec(rank=4, targets=("q_proj", "v_proj")),
            "t1": AdapterSpec(rank=8, targets="all-linear")}


def _lora(rank: int, targets) -> LoraConfig:
    return LoraConfig(r=rank, target_modules=targets, lora_dropout=0.0)


def _config() -> T.LlamaConfig:
    return T.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def program():
    """Two LoRA tasks (rank 4 on q,v; rank 8 on every linear) on one tiny Llama, fused
    spatially: one forward and one backward over both tasks' tokens per step."""
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(_config()).eval()
    models = [make_peft(base, _lora(4, ["q_proj", "v_proj"]), 0),
              make_peft(base, _lora(8, "all-linear"), 1)]
    tasks = [muxc.Task(name=f"t{i}", model=m) for i, m in enumerate(models)]
    return muxc.compile(tasks, muxc.Options(fusion="spatial"))  # the program estimate_step prices


@pytest.fixture(scope="module")
def summary(program):
    return summarize_graph(program.mux)


@pytest.fixture
def one_thread():
    """Time on one thread: with other processes on the 2 cores, a 2-thread op waits for a
    descheduled peer at every barrier, and per-thread CPU time is only defined for one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(rows: int, seq: int):
    return {f"t{i}": make_batch(rows, seq, i, pad_rows=0) for i in range(2)}


# ------------------------------------------------------------------------- latency fit

@pytest.mark.parametrize("knee", [300.0, 64.0, 1000.0])
def test_fit_recovers_a_synthetic_knee_exactly(knee):
    truth = LatencyModel(flat=2e-5, intercept=2e-5 - 1e-8 * knee, slope=1e-8, saturation=knee)
    xs = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    fit = fit_latency(xs, [truth.predict(x) for x in xs])
    assert fit.saturation == pytest.approx(knee, rel=1e-9)
    assert fit.flat == pytest.approx(2e-5, rel=1e-9)
    assert fit.slope == pytest.approx(1e-8, rel=1e-9)
    for x in (1, 100, 5000, 10**6):
        assert fit.predict(x) == pytest.approx(truth.predict(x), rel=1e-9)


def test_fit_handles_all_linear_all_flat_and_repeats():
    xs = [16, 64, 256, 1024]
    linear = fit_latency(xs, [1e-6 + 1e-9 * x for x in xs])  # saturated from the start (CPU)
    assert linear.saturation == pytest.approx(16)
    assert linear.predict(2048) == pytest.approx(1e-6 + 2048e-9)
    flat = fit_latency(xs, [5e-6] * 4)  # launch-bound everywhere (small GPU kernels)
    assert flat.slope == 0 and flat.predict(10**6) == pytest.approx(5e-6)
    noisy = fit_latency([16, 16, 16, 64, 64, 64], [1.0, 9.0, 1.1, 2.0, 2.1, 50.0])  # medians
    assert noisy.predict(16) == pytest.approx(1.1) and noisy.predict(64) == pytest.approx(2.1)
    with pytest.raises(CostModelError, match="no usable latency samples"):
        fit_latency([0, 16], [1.0, 0.0])


# ---------------------------------------------------------------------- profile cache

def test_profile_json_round_trip_and_cache(tmp_path):
    keys = [OpKey(OpKind.GEMM, (32, 48)), OpKey(OpKind.LOSS, (VOCAB,))]
    kw = dict(tokens=(16, 64), elementwise_numels=(1024, 4096), repeats=1)
    prof = profile_device("cpu", keys, **kw)
    assert {str(k) for k in keys} <= set(prof.samples)
    assert prof.peak_flops > 0 and prof.peak_bandwidth > 0 and prof.overhead > 0
    path = prof.save(tmp_path / "p" / "cpu.json")
    assert DeviceProfile.load(path) == prof
    assert DeviceProfile.from_json(json.loads(path.read_text())) == prof
    # same device: reused as is; a missing key is profiled and saved back
    assert load_or_profile(path, "cpu", keys, **kw) == prof
    more = load_or_profile(path, "cpu", [*keys, OpKey(OpKind.GEMM, (16, 16))], **kw)
    assert "gemm:float32:16x16" in more.samples and DeviceProfile.load(path) == more
    # another device (here: another torch version) makes the file stale: re-profiled
    data = json.loads(path.read_text())
    data["identity"]["torch"] = "0.0.0"
    path.write_text(json.dumps(data))
    fresh = load_or_profile(path, "cpu", keys, **kw)
    assert fresh.identity["torch"] == torch.__version__
    path.write_text("{not json")
    with pytest.raises(CostModelError, match="not JSON"):
        DeviceProfile.load(path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(CostModelError, match="format"):
        DeviceProfile.load(path)


# ------------------------------------------------------------------------- roofline

def test_roofline_fallback_is_monotone_in_tokens(summary):
    cost = CostModel(roofline=Roofline(peak_flops=1e11, peak_bandwidth=2e10, overhead=5e-6))
    assert cost.model(OpKey(OpKind.GEMM, (128, 128))) is None  # nothing fitted: roofline
    for key in summary.op_keys():
        for backward in (False, True):
            ts = [cost.latency(key, w, backward) for w in (1, 16, 256, 4096, 65536)]
            assert ts == sorted(ts), f"{key} backward={backward}: {ts}"
    steps = [estimate_step(summary, {"t0": n, "t1": n}, seq_len=128, cost=cost).total
             for n in (128, 256, 1024, 4096)]
    assert steps == sorted(steps) and steps[0] > 0
    gemm = OpKey(OpKind.GEMM, (1000, 1000))  # compute-bound: 2 GFLOP at 100 GFLOP/s
    assert cost.latency(gemm, 1000) == pytest.approx(0.02 + 5e-6)
    assert Roofline.for_device("NVIDIA H200", "bfloat16").peak_bandwidth == 4.8e12


# ------------------------------------------------------------- step time vs measurement

def _measure(program, batches, clock: Clock, repeats: int) -> list[float]:
    params = [p for s in program.states.values() for p in s.params]
    out = []
    for i in range(repeats + 1):
        for p in params:
            p.grad = None  # as after each task's optimizer step
        t0 = clock.now(torch.device("cpu"))
        program.forward_backward(batches)
        t1 = clock.now(torch.device("cpu"))
        if i:  # the first run warms up
            out.append(t1 - t0)
    return out


@pytest.mark.quiet
def test_predicted_step_time_within_30_percent_of_measured(program, summary, one_thread):
    """Predicted forward+backward step time of the real merged program within 30% of its
    measured time, at 256, 1024 and 2048 tokens, from a profile taken in this process.

    Time is this thread's CPU time (the profile uses the same clock), and the test is ``quiet``
    (no other test of the suite runs meanwhile): a compile in the other xdist worker shares the
    cores' caches and memory bandwidth and moved the measured steps by ±30% against the profile's
    short op loops (CI, stop 23: −32% at 256 tokens; dry runs: +30%, +36%). Alone it still
    failed once at +33% (256 tokens) when the three rounds' profiles were merged.
    Profiling and measuring are interleaved over three rounds so both see the same conditions;
    the prediction is the median of the three predictions (one per round's profile), the
    measurement the median of all timed steps. The profile covers the graph's own op shapes (its attention at the steps'
    batch shapes).
    """
    clock = Clock.THREAD
    attention_shapes = tuple(sorted({(2 * r, s) for r, s in STEP_SHAPES} | {(1, 64), (1, 128)}))
    batches = {shape: _batches(*shape) for shape in STEP_SHAPES}
    costs, measured = [], {shape: [] for shape in STEP_SHAPES}
    for _ in range(3):
        costs.append(CostModel(profile_device("cpu", summary.op_keys(), clock=clock, repeats=3,
                                              attention_shapes=attention_shapes)))
        for shape in STEP_SHAPES:
            measured[shape] += _measure(program, batches[shape], clock, repeats=3)
    report, worst = [], 0.0
    for rows, seq in STEP_SHAPES:
        # the median of the three profiles' predictions (merging them averaged a disturbed
        # round in: one round's call overhead 7.8 us against 4.1 made the merged profile 6.0)
        est = statistics.median(
            estimate_step(summary, {"t0": rows * seq, "t1": rows * seq}, seq_len=seq,
                          cost=cost).total for cost in costs)
        meas = statistics.median(measured[(rows, seq)])
        err = est / meas - 1
        worst = max(worst, abs(err))
        report.append(f"{2 * rows * seq} tokens: predicted {est * 1e3:.1f} ms, measured "
                      f"{meas * 1e3:.1f} ms ({err:+.1%})")
    assert worst <= STEP_TOLERANCE, "; ".join(report)


def test_thread_clock_needs_one_cpu_thread():
    if torch.get_num_threads() == 1:
        pytest.skip("torch runs one thread here; the check needs more")
    with pytest.raises(CostModelError, match="get_num_threads"):
        profile_device("cpu", [], clock="thread")


# ----------------------------------------------------------------------- memory model

def test_activation_memory_matches_tensors_saved_for_backward(program, summary, one_thread):
    """The activation model counts what autograd keeps, measured with saved-tensor hooks."""
    for rows, seq in ((1, 128), (2, 256), (1, 512)):
        est = estimate_memory(summary, {"t0": rows * seq, "t1": rows * seq}, seq_len=seq)
        measured = saved_bytes(program, _batches(rows, seq))
        assert est.activations == pytest.approx(measured, rel=0.05), (rows, seq)


@pytest.mark.parametrize("family", [f for f in CORE_FAMILIES if f != "llama"])  # llama: above
def test_summary_reads_every_core_family(bases, family):
    """GPT-2 (Conv1D addmm, GELU, LayerNorm) and OPT (ReLU, biases) summarise, price, and
    predict their saved activations, like Llama."""
    model = make_peft(bases(family), _lora(4, "all-linear"), 3)
    prog = muxc.compile([muxc.Task(name="a", model=model)])
    s = summarize_graph(prog.mux)
    kinds = {k.kind for k in s.op_keys()}
    assert {OpKind.GEMM, OpKind.ATTENTION, OpKind.LORA, OpKind.LOSS} <= kinds, kinds
    est = estimate_memory(s, {"a": 2 * 24}, seq_len=24)
    measured = saved_bytes(prog, {"a": make_batch(2, 24, 0)})
    assert est.activations == pytest.approx(measured, rel=0.05)
    cost = CostModel(roofline=Roofline(1e11, 2e10, 5e-6))
    assert estimate_step(s, {"a": 48}, seq_len=24, cost=cost).total > 0


def test_chunked_attention_is_priced_by_the_keys_it_attends_to(bases):
    """With alignment='chunk' attention nodes attend to kept K/V: their work grows with kv_len,
    and gathering the kept K/V costs extra only past the first chunk."""
    model = make_peft(bases("llama"), _lora(4, ["q_proj"]), 4)
    options = muxc.Options(alignment="chunk", chunk_size=8)
    prog = muxc.compile([muxc.Task(name="a", model=model)], options)
    s = summarize_graph(prog.mux)
    assert sum(o.forward.key.kind is OpKind.ATTENTION for o in s.ops if o.forward) == 2
    exact = CostModel(roofline=Roofline(1e11, 2e10, 0.0))
    first = estimate_step(s, StepShape({"a": 2}, 8), cost=exact)
    third = estimate_step(s, StepShape({"a": 2}, 8, kv_len=24), cost=exact)
    assert third.by_kind["attention"] == pytest.approx(3 * first.by_kind["attention"], rel=0.02)
    assert third.by_kind["elementwise"] > first.by_kind["elementwise"]
    with pytest.raises(CostModelError, match="kv_len"):
        StepShape({"a": 2}, 8, kv_len=4)


def test_memory_counts_shared_weights_once_and_state_per_task(program, summary):
    mux = program.mux
    storages = [mux.tensors[n.name].untyped_storage() for n in mux.nodes_with(Role.FROZEN)]
    frozen = {st.data_ptr(): st.nbytes() for st in storages}
    assert summary.frozen_bytes == sum(frozen.values())
    adapter = {t: sum(p.numel() * p.element_size() for p in s.params)
               for t, s in program.states.items()}
    assert dict(summary.adapter_bytes) == adapter
    est = estimate_memory(summary, {"t0": 256}, seq_len=128, in_flight=2)
    one = estimate_memory(summary.restrict(["t0"]), {"t0": 256}, seq_len=128, in_flight=2)
    assert est.weights == one.weights  # one copy of the base whatever the number of tasks
    assert est.adapters == sum(adapter.values()) == est.gradients == est.optimizer / 2
    assert est.activations == one.activations  # t1 idle: no activations
    assert est.total == est.weights + 4 * est.adapters + est.activations
    with pytest.raises(CostModelError, match="not in the summary"):
        estimate_memory(summary, {"nope": 16}, seq_len=16)


# ------------------------------------------------------------------ config-only summary

def test_config_summary_agrees_with_the_traced_graph(summary):
    cfg_summary = summarize_config(_config(), ADAPTERS)
    assert cfg_summary.adapter_numel == summary.adapter_numel
    assert cfg_summary.frozen_bytes == pytest.approx(summary.frozen_bytes, rel=1e-3)
    for b, s in ((1, 128), (8, 512)):
        assert cfg_summary.saved(b, s) == pytest.approx(summary.saved(b, s), rel=0.02)
    heavy = {OpKind.GEMM, OpKind.ATTENTION, OpKind.LORA, OpKind.LOSS}
    assert ({k for k in cfg_summary.op_keys() if k.kind in heavy}
            == {k for k in summary.op_keys() if k.kind in heavy})
    cost = CostModel(roofline=Roofline(1e11, 2e10, 5e-6))
    for tokens, seq in ((256, 128), (4096, 512)):
        a = estimate_step(summary, {"t0": tokens, "t1": tokens}, seq_len=seq, cost=cost)
        b = estimate_step(cfg_summary, {"t0": tokens, "t1": tokens}, seq_len=seq, cost=cost)
        assert b.total == pytest.approx(a.total, rel=0.03)
        assert b.by_kind["gemm"] == pytest.approx(a.by_kind["gemm"], rel=1e-9)
    with pytest.raises(CostModelError, match="not Llama linear modules"):
        AdapterSpec(targets=("c_attn",))
    with pytest.raises(CostModelError, match="summarize_graph"):
        summarize_config(T.GPT2Config(), ADAPTERS)


# ------------------------------------------------------------- step estimate semantics

def test_step_estimate_prices_active_tasks_padding_and_saturation(summary):
    cost = CostModel(roofline=Roofline(1e11, 2e10, 5e-6))
    both = estimate_step(summary, {"t0": 256, "t1": 256}, seq_len=128, cost=cost)
    only = estimate_step(summary, {"t0": 512}, seq_len=128, cost=cost)
    assert only.total < both.total  # same tokens, fewer adapters
    padded = estimate_step(summary, {"t0": 129}, seq_len=128, cost=cost)
    assert padded.padded_tokens == 256 and padded.tokens == 129
    exact = CostModel(roofline=Roofline(1e11, 2e10, 0.0))  # no per-op overhead: work scales
    chunked = estimate_step(summary, StepShape({"t0": 2}, 128, kv_len=512), cost=exact)
    plain = estimate_step(summary, StepShape({"t0": 2}, 128), cost=exact)
    assert chunked.by_kind["attention"] == pytest.approx(4 * plain.by_kind["attention"], rel=0.01)
    sat = saturation_tokens(summary, cost=cost, seq_len=128)
    assert 128 <= sat < 1 << 20
    with pytest.raises(CostModelError, match="not in the summary"):
        estimate_step(summary, {"zz": 4}, seq_len=4, cost=cost)


# --------------------------------------------------------------- per-call overhead

def _forward_ops(summary) -> int:
    return sum(o.forward is not None for o in summary.ops if o.site is None) + len(
        {o.site for o in summary.ops if o.site is not None})


def test_every_op_call_pays_the_call_overhead(summary):
    """A graph with N ops predicts at least N x the overhead, and exactly calls x overhead
    more than without it (one call per op forward, one per op with a backward)."""
    roof = Roofline(1e11, 2e10, 0.0)
    free = estimate_step(summary, {"t0": 256, "t1": 256}, seq_len=128,
                         cost=CostModel(roofline=roof))
    paid = estimate_step(summary, {"t0": 256, "t1": 256}, seq_len=128,
                         cost=CostModel(roofline=roof, call_overhead=1e-3))
    n = _forward_ops(summary)
    assert n > 100 and paid.calls > n  # forward calls plus backward calls
    assert paid.total >= n * 1e-3
    assert paid.total - free.total == pytest.approx(paid.calls * 1e-3, rel=1e-9)
    assert paid.by_kind["overhead"] == pytest.approx(paid.calls * 1e-3, rel=1e-9)
    with pytest.raises(CostModelError, match="call_overhead"):
        CostModel(roofline=roof, call_overhead=-1.0)


def test_micro_batches_multiply_the_calls(summary):
    """m micro-batches (chunk steps) call every op m times on 1/m of the work: the overhead is
    paid m times, the (linear) GEMM work is not."""
    roof = Roofline(1e11, 2e10, 0.0)
    cost = CostModel(roofline=roof, call_overhead=1e-4)
    one = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, cost=cost)
    four = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, cost=cost,
                         micro_batches=4)
    assert four.calls == 4 * one.calls and four.micro_batches == 4
    assert four.by_kind["overhead"] == pytest.approx(4 * one.by_kind["overhead"], rel=1e-9)
    assert four.by_kind["gemm"] == pytest.approx(one.by_kind["gemm"], rel=1e-9)
    # the rest of the difference: attention's roofline bytes grow with sqrt(work)
    assert four.total - one.total == pytest.approx(3 * one.by_kind["overhead"], rel=1e-3)
    with pytest.raises(CostModelError, match="micro_batches"):
        estimate_step(summary, {"t0": 512}, seq_len=128, cost=cost, micro_batches=0)


def test_roofline_fallback_charges_its_overhead_per_call(summary):
    """Without a profile every op's roofline latency carries the device's per-op overhead, so
    splitting a step into micro-batches costs one overhead per op call more each time."""
    assert Roofline.for_device("cpu").overhead > 0
    assert Roofline.for_device("NVIDIA H100 80GB HBM3").overhead == 5e-6  # a kernel launch
    cost = CostModel(roofline=Roofline(1e11, 2e10, 1e-3))
    assert cost.call_overhead == 0.0  # already inside every roofline latency
    one = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, cost=cost)
    two = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, cost=cost,
                        micro_batches=2)
    assert two.total - one.total == pytest.approx(one.calls * 1e-3, rel=0.02)
    # and each device's datasheet roofline charges every micro-batch one run of the graph
    for name in ("cpu", "NVIDIA H100 80GB HBM3"):
        roof = Roofline.for_device(name)
        assert roof.run_overhead > 0 and CostModel(roofline=roof).run_overhead == roof.run_overhead


def test_every_micro_batch_pays_one_run_of_the_graph(summary):
    """Each micro-batch (chunk step) calls the graph and starts the autograd engine once:
    m micro-batches cost exactly m x run_overhead more, split into the forward's part and
    the backward's engine start."""
    roof = Roofline(1e11, 2e10, 0.0)
    for m in (1, 3):
        free = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, micro_batches=m,
                             cost=CostModel(roofline=roof))
        paid = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, micro_batches=m,
                             cost=CostModel(roofline=roof, run_overhead=2e-3))
        assert paid.total - free.total == pytest.approx(m * 2e-3, rel=1e-9)
        assert paid.by_kind["overhead"] == pytest.approx(m * 2e-3, rel=1e-9)
    with pytest.raises(CostModelError, match="run_overhead"):
        CostModel(roofline=roof, run_overhead=-1.0)


def test_every_extra_task_at_a_site_pays_the_site_task_cost(summary):
    """One kernel call per kind serves every task at a site, but each task beyond the first
    adds its own measured cost to it (forward, and backward where it has one): exactly
    (tasks - 1) x site_task per site and micro-batch; a task alone pays none."""
    roof = Roofline(1e11, 2e10, 0.0)
    shared = sum(count * (len(members) - 1) for members, count in summary.sites)
    assert shared > 0  # t1's all-linear LoRA shares q and v with t0
    for m in (1, 2):
        def total(site_task, tokens):
            return estimate_step(summary, tokens, seq_len=128, micro_batches=m,
                                 cost=CostModel(roofline=roof, site_task=site_task)).total

        both = {"t0": 512, "t1": 512}
        assert total((1e-3, 2e-3), both) - total((0.0, 0.0), both) == pytest.approx(
            m * shared * 3e-3, rel=1e-9)
        alone = {"t1": 512}
        assert total((1e-3, 2e-3), alone) == pytest.approx(total((0.0, 0.0), alone), rel=1e-12)


def test_a_kinds_site_call_also_runs_over_the_other_tasks_tokens(summary):
    """A kind's multi-task call covers every active task's tokens, giving tasks without that
    kind a neutral adapter: LoRA copies their segment of the base output (and zeroes their
    input gradient), IA3 scales them by ones. t1 alone at a site, t0 active too: that call
    costs t0's copy more; with t0 inactive, nothing."""
    from muxc.plan.cost import _neutral

    cost = CostModel(roofline=Roofline(1e11, 1e10, 0.0))
    lora, ia3 = OpKey(OpKind.LORA, (64, 32, 8)), OpKey(OpKind.IA3, (32,))
    f, b = _neutral(cost, lora, lora, 50.0, 100.0)
    assert f == pytest.approx(2 * 100 * 32 * 4 / 1e10) and b == pytest.approx(100 * 64 * 4 / 1e10)
    f, b = _neutral(cost, ia3, ia3, 50.0, 100.0)
    assert f == pytest.approx(cost.latency(ia3, 150.0) - cost.latency(ia3, 50.0)) and f > 0
    assert _neutral(cost, lora, lora, 50.0, 0.0) == (0.0, 0.0)
    # in a step: sites holding only t1's LoRA pay for t0's tokens when t0 runs alongside
    only_t1 = sum(count for members, count in summary.sites if {t for t, _, _ in members} == {"t1"})
    assert only_t1 > 0
    both = estimate_step(summary, {"t0": 512, "t1": 512}, seq_len=128, cost=cost)
    alone = [estimate_step(summary, {t: 512}, seq_len=128, cost=cost) for t in ("t0", "t1")]
    assert not [m for m, _ in summary.sites if {t for t, _, _ in m} == {"t0"}]
    # t1 alone, plus per t1-only site a copy and its backward, plus t0's loss and its backward
    assert both.calls == alone[1].calls + 2 * only_t1 + 2


def test_engine_start_is_taken_out_of_backward_samples():
    """Every probe's backward started the autograd engine; a graph's backward does that once
    per micro-batch (inside run_overhead), so the fitted backward latencies leave it out."""
    samples = {"gemm:float32:64x64": (Sample(16, 1e-4, 3e-4), Sample(64, 2e-4, 5e-4))}
    prof = DeviceProfile({"device_kind": "cpu"}, Clock.THREAD, 1e11, 1e10, 1e-6, samples,
                         call_overhead=1e-6, run_overhead=1.5e-4, backward_start=1e-4)
    cost = CostModel(prof)
    key = OpKey(OpKind.GEMM, (64, 64))
    assert cost.latency(key, 16, backward=True) == pytest.approx(2e-4)
    assert cost.latency(key, 64, backward=True) == pytest.approx(4e-4)
    assert cost.latency(key, 64) == pytest.approx(2e-4)  # forward samples as measured
    assert cost.run_overhead == 1.5e-4 and cost.backward_start == 1e-4


def test_profile_measures_the_call_overhead(tmp_path, one_thread):
    prof = profile_device("cpu", [], elementwise_numels=(1024,), repeats=2, clock="thread")
    assert 0 < prof.call_overhead < 1e-3
    assert 0 <= prof.backward_start <= prof.run_overhead < 1e-2
    assert 0 <= prof.site_task_forward < 1e-2 and 0 <= prof.site_task_backward < 1e-2
    cost = CostModel(prof)
    assert cost.call_overhead == prof.call_overhead and cost.run_overhead == prof.run_overhead
    assert cost.site_task == (prof.site_task_forward, prof.site_task_backward)
    assert DeviceProfile.load(prof.save(tmp_path / "p.json")) == prof
    old = tmp_path / "old.json"  # a format-1 profile has no call overhead: profiled afresh
    old.write_text(json.dumps({**prof.to_json(), "format": 1}))
    again = load_or_profile(old, "cpu", [], elementwise_numels=(1024,), repeats=1,
                            clock="thread")
    assert again.call_overhead > 0 and DeviceProfile.load(old) == again


def test_isolated_profile_is_taken_in_a_child_process(tmp_path, monkeypatch):
    """`load_or_profile(profiler=profile_in_child)` (what ``Options(cost_model=path)`` uses)
    profiles in a child process: this one runs no probe, and the profile is this device's."""
    import muxc.plan.profile as profile_module

    def here(*args, **kwargs):
        raise AssertionError("profiled in the calling process")

    monkeypatch.setattr(profile_module, "profile_device", here)
    keys = [OpKey(OpKind.GEMM, (32, 48))]
    path = tmp_path / "cpu.json"
    prof = load_or_profile(path, "cpu", keys, profiler=profile_in_child, tokens=(16,),
                           elementwise_numels=(1024,), repeats=1)
    assert "gemm:float32:32x48" in prof.samples and prof.identity == device_identity("cpu")
    assert DeviceProfile.load(path) == prof
    with pytest.raises(CostModelError, match="child process failed(.|\n)*repeats >= 1"):
        load_or_profile(tmp_path / "bad.json", "cpu", keys, profiler=profile_in_child,
                        repeats=0)


def test_chunk_choice_trades_padding_against_calls(program):
    """With free calls an hTask's chunk size is small (least padding: chunks of 32 pack the
    short samples behind each other); when every call is expensive, one chunk step holding
    the longest sample wins."""
    from muxc.plan.fusion import AutoFusion

    batches = {"t0": lengths_batch((96, 30, 20), 0), "t1": lengths_batch((64, 40), 1)}
    options = muxc.Options(alignment="chunk")
    roof = Roofline(1e11, 2e10, 0.0)
    free = AutoFusion(program.mux, options, CostModel(roofline=roof))
    dear = AutoFusion(program.mux, options, CostModel(roofline=roof, call_overhead=1e-3))
    group = [("t0", "t1")]
    assert free.group_chunks(batches, group, 16) == (32,)
    assert dear.group_chunks(batches, group, 16) == (96,)
    loads = {t: (96 * 4, 96, 4) for t in batches}
    small, large = (dear.price(loads, ("t0", "t1"), c) for c in (16, 64))
    assert small.micro_batches == 6 and large.micro_batches == 2  # 96 tokens per stream


def test_pipeline_iteration_time_formula():
    assert pipeline_iteration_time([1.0, 2.0, 1.5], micro_batches=[4, 2]) == 16.0
    assert pipeline_iteration_time([1.0, 2.0], 4, comm_time=0.5, hidden_comm=1.0) == 11.5
    assert pipeline_iteration_time([2.0], 3, hidden_comm=100.0) == 6.0  # never below busy time
    assert bubble_fraction(1, 5) == 0.0 and bubble_fraction(4, 8) == pytest.approx(3 / 11)
    with pytest.raises(CostModelError, match="micro-batch"):
        pipeline_iteration_time([1.0], 0)


def test_summary_is_fast_and_cheap_to_evaluate(summary):
    cost = CostModel(roofline=Roofline(1e11, 2e10, 5e-6))
    t0 = time.perf_counter()
    for n in range(1, 201):
        estimate_step(summary, {"t0": 64 * n, "t1": 32 * n}, seq_len=64, cost=cost)
    assert (time.perf_counter() - t0) / 200 < 5e-3  # the fusion DP evaluates many groups


def test_adapter_probes_call_like_a_site():
    """The LoRA and IA3 probes call a real adapter site (`OutputSite` through the runtime's
    site implementation, arguments built once), so their samples include what the executor
    pays per site call besides the kernel: h + s*B(A(x)) and h * v, differentiable in h."""
    from muxc.ir import OutputSite
    from muxc.plan.profile import PROBES

    torch.manual_seed(0)
    fwd, _ = PROBES[OpKind.LORA](OpKey(OpKind.LORA, (8, 6, 2)), 5, torch.device("cpu"))
    cells = [c.cell_contents for c in fwd.__closure__]
    site = next(c for c in cells if isinstance(c, OutputSite))
    x = next(c for c in cells if isinstance(c, torch.Tensor) and c.shape == (1, 5, 8))
    h = next(c for c in cells if isinstance(c, torch.Tensor) and c.shape == (1, 5, 6))
    (rec,) = site.records
    a, bm = rec.params["A"], rec.params["B"]
    out = fwd()
    torch.testing.assert_close(out, h + 2.0 * (x @ a.T) @ bm.T)
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones(1, 5, 6))  # the base output is an input of the call
    assert a.grad is not None and bm.grad is not None
    ia3, _ = PROBES[OpKind.IA3](OpKey(OpKind.IA3, (6,)), 5, torch.device("cpu"))
    cells = [c.cell_contents for c in ia3.__closure__]
    (rec,) = next(c for c in cells if isinstance(c, OutputSite)).records
    h = next(c for c in cells if isinstance(c, torch.Tensor) and c.shape == (1, 5, 6))
    torch.testing.assert_close(ia3(), h * rec.params["v"])


def test_each_htask_gets_its_own_chunk_size(program):
    """Without a fixed chunk_size every hTask runs its own: with dear calls the one chunk
    step of its longest sample (packing, no per-chunk-step cost); with free calls the small
    chunks that leave the least padding. The plan runs what was priced."""
    from muxc.ir.chunks import stream_chunks
    from muxc.plan.fusion import AutoFusion, sample_lengths
    from muxc.plan.step import Planner

    short, long = _batch_lengths([20, 9, 17, 5]), _batch_lengths([90, 40, 77])
    batches = {"t0": short, "t1": long}
    roof = Roofline(1e11, 2e10, 0.0)
    options = muxc.Options(alignment="chunk")
    dear = AutoFusion(program.mux, options, CostModel(roofline=roof, call_overhead=1e-3))
    free = AutoFusion(program.mux, options, CostModel(roofline=roof))
    groups = (("t0",), ("t1",))
    lengths = sample_lengths(batches)
    one_step = dear.group_chunks(batches, groups, 64)
    # one chunk step each: t0 its longest sample (3 rows of 20); t1 two streams of 128
    # (90 | 77+40) beat three rows of its longest sample, 90
    assert one_step == (20, 128)
    assert [stream_chunks(lengths[t], c) for (t,), c in zip(groups, one_step)] == [(1,) * 3, (1,) * 2]
    small = free.group_chunks(batches, groups, 64)
    steps = [max(stream_chunks(lengths[t], c)) for (t,), c in zip(groups, small)]
    assert steps[1] > 1  # free calls: the long task runs several smaller chunks ...
    padded = [sum(stream_chunks(lengths[t], c)) * c for (t,), c in zip(groups, small)]
    assert padded[1] < 3 * 90  # ... and computes less padding than the one-step layout
    plan = Planner(program.mux, muxc.Options(fusion="temporal", alignment="chunk")).plan(batches)
    assert plan.chunk_sizes == tuple(h.layout.chunk_size for h in plan.htask_plans)
    fixed = Planner(program.mux, muxc.Options(fusion="temporal", alignment="chunk", chunk_size=32))
    assert fixed.plan(batches).chunk_sizes == (32, 32)


def _batch_lengths(lengths):
    batch = make_batch(len(lengths), max(lengths), sum(lengths))
    mask = torch.zeros_like(batch["input_ids"])
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return {"input_ids": batch["input_ids"] * mask, "attention_mask": mask,
            "labels": batch["input_ids"].masked_fill(mask == 0, -100)}
