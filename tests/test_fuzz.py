"""Property-based fuzzing (hypothesis) of everything a tenant supplies: batches, options, names.

One invariant: a call either gives every task exactly what isolated HF PEFT gives it (losses
and adapter grads; a task without label tokens is left out), or raises a `MuxcError` with no
adapter, gradient or optimizer state changed. Never another exception type.

One tiny program is compiled per module; every example reuses it. Example counts come from
the hypothesis profile (tests/conftest.py: ``default`` is small and derandomized, so the
count is fixed; ``HYPOTHESIS_PROFILE=long`` runs many more). Each test records how many
examples it ran (``fuzz_examples``, printed in the terminal summary) and, per bad-input kind,
what muxc answered (``fuzz_outcomes``).
"""

from __future__ import annotations

import math
import string
import warnings
from collections import Counter

import pytest
import torch
from helpers import REL_TOL, isolated, rel_err, same, training_snapshot
from hypothesis import example, given, note
from hypothesis import strategies as st
from models import VOCAB, make_peft
from peft import LoraConfig

import muxc
from muxc.names import safe_child

TASKS = ("a", "b")


@pytest.fixture(scope="module")
def fuzzed(llama):
    """(program, models): two LoRA tasks, fusion auto, alignment chunk; stepped once so the
    optimizer state exists."""
    models = {
        "a": make_peft(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.0), 1),
        "b": make_peft(llama, LoraConfig(r=2, target_modules=["up_proj", "down_proj"],
                                         lora_dropout=0.0), 2),
    }
    program = muxc.compile([muxc.Task(name=n, model=m) for n, m in models.items()],
                           muxc.Options(fusion="auto", alignment="chunk"))
    program.step({n: _valid(2, 5, seed=i) for i, n in enumerate(TASKS)})
    return program, models


def _valid(rows: int, seq: int, seed: int, lens: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    lens = lens or [seq] * rows
    mask = (torch.arange(seq) < torch.tensor(lens)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ---- the corruptions: kind -> function(batches, draw-able args) ------------------------------

DTYPES = [torch.bool, torch.float32, torch.float16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.float64]


def _victim(batches):
    return batches["b"]


CORRUPTIONS = {
    "ids dtype": lambda bs, d: _victim(bs).update(input_ids=_victim(bs)["input_ids"].to(d["dtype"])),
    "labels dtype": lambda bs, d: _victim(bs).update(labels=_victim(bs)["labels"].to(d["dtype"])),
    "mask dtype": lambda bs, d: _victim(bs).update(
        attention_mask=_victim(bs)["attention_mask"].to(d["dtype"])),
    "id out of range": lambda bs, d: _victim(bs)["input_ids"].__setitem__((0, 0), d["bad_id"]),
    "label out of range": lambda bs, d: _victim(bs)["labels"].__setitem__((0, 0), d["bad_label"]),
    "mask value": lambda bs, d: _victim(bs).update(attention_mask=_put(
        _victim(bs)["attention_mask"].float(), d["mask_value"])),
    "nan/inf in float ids": lambda bs, d: _victim(bs).update(input_ids=_put(
        _victim(bs)["input_ids"].float(), d["nonfinite"])),
    "nan/inf in float labels": lambda bs, d: _victim(bs).update(labels=_put(
        _victim(bs)["labels"].float(), d["nonfinite"])),
    "labels shape": lambda bs, d: _victim(bs).update(labels=_victim(bs)["labels"][:, :-1]),
    "mask shape": lambda bs, d: _victim(bs).update(attention_mask=_victim(bs)["attention_mask"].T),
    "1-D ids": lambda bs, d: _victim(bs).update(input_ids=_victim(bs)["input_ids"].flatten()),
    "3-D ids": lambda bs, d: _victim(bs).update(input_ids=_victim(bs)["input_ids"][None]),
    "empty rows": lambda bs, d: _victim(bs).update({k: v[:0] for k, v in _victim(bs).items()}),
    "empty seq": lambda bs, d: _victim(bs).update({k: v[:, :0] for k, v in _victim(bs).items()}),
    "extra field": lambda bs, d: _victim(bs).update({d["extra"]: _victim(bs)["input_ids"]}),
    "missing labels": lambda bs, d: _victim(bs).pop("labels"),
    "missing input_ids": lambda bs, d: _victim(bs).pop("input_ids"),
    "missing mask": lambda bs, d: _victim(bs).pop("attention_mask"),
    "not a tensor": lambda bs, d: _victim(bs).update(input_ids=_victim(bs)["input_ids"].tolist()),
    "batch not a dict": lambda bs, d: bs.update(b=list(_victim(bs).values())),
    "unknown task": lambda bs, d: bs.update({d["name"]: bs.pop("b")}),
    "labels all -100": lambda bs, d: _victim(bs).update(
        labels=torch.full_like(_victim(bs)["labels"], -100)),
    "label only at position 0": lambda bs, d: _victim(bs).update(labels=torch.cat(
        [_victim(bs)["labels"][:, :1], torch.full_like(_victim(bs)["labels"][:, 1:], -100)], 1)),
    "left padded": lambda bs, d: _victim(bs).update(
        {k: v.flip(1) for k, v in _victim(bs).items()}),
    "label on padding": lambda bs, d: _victim(bs)["labels"].masked_fill_(
        _victim(bs)["attention_mask"] == 0, 5),
    "mask row all zero": lambda bs, d: _victim(bs).update(
        attention_mask=_victim(bs)["attention_mask"].index_fill(0, torch.tensor([0]), 0),
        labels=_victim(bs)["labels"].index_fill(0, torch.tensor([0]), -100)),
    "over max_task_tokens": lambda bs, d: bs.update(
        b=_valid(8, 16, seed=d["seed"])),  # the options below cap a task at 100 tokens
}


def _close(got: torch.Tensor, want: torch.Tensor, scale: float) -> bool:
    """Within REL_TOL, or off by round-off only: at most 1e-6 of ``scale``, the task's largest
    reference grad norm (a grad that is zero up to fp32 noise, e.g. of the query of a sample's
    first token, has no meaningful relative error)."""
    return rel_err(got, want) <= REL_TOL or float((got - want).norm()) <= 1e-6 * scale


def _scale(grads: dict) -> float:
    return max(float(g.norm()) for g in grads.values())


def _put(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t[0, -1] = value
    return t


@st.composite
def step_inputs(draw):
    batches = {}
    for i, name in enumerate(TASKS):
        rows, seq = draw(st.integers(1, 3)), draw(st.integers(2, 9))
        lens = [draw(st.integers(1, seq)) for _ in range(rows)]
        batches[name] = _valid(rows, seq, seed=draw(st.integers(0, 10**6)), lens=lens)
    kinds = draw(st.lists(st.sampled_from(list(CORRUPTIONS)), min_size=1, max_size=2, unique=True))
    args = {
        "dtype": draw(st.sampled_from(DTYPES)),
        "bad_id": draw(st.sampled_from([-1, VOCAB, VOCAB + 1, 2**40, -(2**40)])),
        "bad_label": draw(st.sampled_from([-1, -99, -101, VOCAB, 2**31])),
        "mask_value": draw(st.sampled_from([2.0, -1.0, 0.5, math.nan, math.inf, -math.inf])),
        "nonfinite": draw(st.sampled_from([math.nan, math.inf, -math.inf])),
        "extra": draw(st.sampled_from(["position_ids", "token_type_ids", "pixel_values", "x"])),
        "name": draw(st.sampled_from(["c", "..", "", "b ", "B"])),
        "seed": draw(st.integers(0, 100)),
    }
    fusion = draw(st.sampled_from(["auto", "spatial", "temporal"]))
    return batches, kinds, args, fusion


def _reference(models, batches):
    """task -> (loss, grads) of isolated HF PEFT, or the exception HF raised."""
    refs = {}
    for name, b in batches.items():
        if name not in models:
            continue
        try:
            refs[name] = isolated(models[name], dict(b))
        except Exception as exc:  # noqa: BLE001 - HF's own refusal is recorded, not judged
            models[name].zero_grad(set_to_none=True)
            refs[name] = exc
    return refs


def _apply(batches, drawn, args) -> list[str]:
    """Apply the corruptions ``drawn``; returns those that applied (one may undo what another
    needs, e.g. a removed key or the shape another one indexes)."""
    kinds = []
    for kind in drawn:
        try:
            CORRUPTIONS[kind](batches, args)
        except (KeyError, AttributeError, TypeError, IndexError, RuntimeError):
            continue
        kinds.append(kind)
    return kinds


def _check_invariant(program, models, batches, fusion: str) -> str:
    """Run ``batches``; assert the invariant (module doc); return what muxc answered."""
    p = program.with_options(fusion=fusion, max_task_tokens=100)
    refs = _reference(models, batches) if isinstance(batches, dict) else {}
    for st_ in program.states.values():  # grads exist: "unchanged" covers them
        for q in st_.params:
            q.grad = torch.zeros_like(q)
    before = training_snapshot(program)
    exc = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            losses = p.forward_backward(batches)
        except muxc.MuxcError as e:
            exc = e
        # any other exception type propagates and fails the test
    try:
        if exc is not None:
            assert same(training_snapshot(program), before), f"{type(exc).__name__} changed state"
            return type(exc).__name__
        left_out = {n for n, o in p.last_step.items() if o.skipped}
        assert left_out == {n for n in batches if n not in losses}
        for name in left_out:  # only tasks without label tokens; their grads untouched
            assert p.last_step[name].why == "no label tokens"
            assert any(isinstance(w.message, muxc.EmptyBatchWarning) for w in caught)
            assert same(training_snapshot(program)[name], before[name])
        for name, loss in losses.items():
            ref = refs[name]
            assert not isinstance(ref, Exception), f"task {name}: HF raised {ref!r}, muxc ran"
            ref_loss, ref_grads = ref
            assert rel_err(loss, ref_loss) <= REL_TOL, (name, loss, ref_loss)
            got = dict(models[name].named_parameters())
            for pname, g in ref_grads.items():
                assert _close(got[pname].grad, g, _scale(ref_grads)), (name, pname)
        return "left out (EmptyBatchWarning), others = HF" if left_out else "= HF PEFT"
    finally:
        for st_ in program.states.values():
            st_.optimizer.zero_grad(set_to_none=True)


ARGS = {"dtype": torch.float32, "bad_id": VOCAB, "bad_label": -1, "mask_value": 2.0,
        "nonfinite": math.nan, "extra": "position_ids", "name": "..", "seed": 0}


def test_every_corruption_kind_once(fuzzed, record_property):
    """Each kind alone on b's batch (a is valid), so the summary lists every kind."""
    program, models = fuzzed
    answers = {}
    for kind in CORRUPTIONS:
        batches = {"a": _valid(2, 6, 1, lens=[6, 4]), "b": _valid(3, 5, 2, lens=[5, 3, 4])}
        assert _apply(batches, [kind], ARGS) == [kind]
        answers[kind] = _check_invariant(program, models, batches, "auto")
    assert answers["id out of range"] == "BatchError"  # the oracle is not vacuous
    assert answers["over max_task_tokens"] == "AdmissionError"
    assert answers["labels all -100"].startswith("left out")
    record_property("fuzz_examples", len(answers))
    record_property("fuzz_outcomes", answers)


def test_fuzz_batches(fuzzed, record_property):
    program, models = fuzzed
    outcomes: dict[str, Counter] = {}

    two_tokens = ({"a": _valid(1, 2, 5), "b": _valid(1, 2, 6, lens=[1])}, ["labels all -100"],
                  dict(ARGS), "auto")  # found by the long profile: q grads zero up to round-off

    @given(step_inputs())
    @example(two_tokens)
    def check(inputs):
        batches, drawn, args, fusion = inputs
        kinds = _apply(batches, drawn, args)
        note(f"kinds={kinds} fusion={fusion} batches={batches}")
        outcome = _check_invariant(program, models, batches, fusion)
        key = " + ".join(kinds) if len(kinds) < 2 else "two kinds combined"
        outcomes.setdefault(key or "none", Counter())[outcome] += 1

    check()
    assert sum(sum(c.values()) for c in outcomes.values()) > 0
    record_property("fuzz_examples", sum(sum(c.values()) for c in outcomes.values()))
    record_property("fuzz_outcomes", {k: dict(v) for k, v in sorted(outcomes.items())})


# ---- options --------------------------------------------------------------------------------

FIELDS = ["fusion", "alignment", "chunk_size", "stages", "micro_batches", "memory_budget",
          "cost_model", "kernel_impl", "verify", "pipeline_timeout", "schedule", "max_bad_steps",
          "max_task_tokens"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
    st.sampled_from(["auto", "spatial", "temporal", "pad", "chunk", "1f1b", "interleaved",
                     "sequential", "grouped", "torch", "triton", "", "AUTO", "x"]),
    st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                              st.integers(), max_size=1),
)
# run-time options a step is run with (cost_model would profile and write a file: left out;
# kernel_impl="triton" would run the Triton interpreter: only the CPU impls)
RUN = {
    "fusion": st.sampled_from(["auto", "spatial", "temporal", "bogus"]),
    "chunk_size": st.one_of(st.none(), st.integers(-1, 40)),
    "micro_batches": st.one_of(st.none(), st.integers(0, 3)),
    "memory_budget": st.one_of(st.none(), st.integers(-1, 2 * 10**6)),
    "schedule": st.sampled_from([None, "1f1b", "interleaved", "sequential", "zz"]),
    "max_bad_steps": st.integers(-1, 4),
    "max_task_tokens": st.one_of(st.none(), st.integers(-1, 60)),
    "kernel_impl": st.sampled_from([None, "grouped", "torch", "cuda"]),
}


def test_fuzz_options_from_dict(record_property):
    outcomes = Counter()

    @given(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), VALUES,
                           max_size=5))
    def check(values):
        try:
            options = muxc.Options.from_dict(values)
        except muxc.MuxcError as e:
            outcomes[type(e).__name__] += 1
            return
        outcomes["built"] += 1
        assert set(values) <= set(FIELDS)
        assert muxc.Options.from_dict({k: getattr(options, k) for k in values}) == options

    check()
    assert sum(outcomes.values()) > 0
    record_property("fuzz_examples", sum(outcomes.values()))
    record_property("fuzz_outcomes", {"Options.from_dict": dict(outcomes)})


def test_fuzz_run_time_options(fuzzed, record_property):
    program, models = fuzzed
    outcomes = Counter()
    batches = {"a": _valid(2, 6, 1, lens=[6, 4]), "b": _valid(1, 5, 2)}
    refs = _reference(models, batches)

    @given(st.fixed_dictionaries({}, optional=RUN))
    def check(changes):
        before = training_snapshot(program)
        try:
            p = program.with_options(**changes)
            losses = p.forward_backward(batches)
        except muxc.MuxcError as e:
            outcomes[type(e).__name__] += 1
            assert same(training_snapshot(program), before)
            return
        outcomes["= HF PEFT"] += 1
        for name, (ref_loss, ref_grads) in refs.items():
            assert rel_err(losses[name], ref_loss) <= REL_TOL
            got = dict(models[name].named_parameters())
            assert all(_close(got[k].grad, g, _scale(ref_grads)) for k, g in ref_grads.items())
        for st_ in program.states.values():
            st_.optimizer.zero_grad(set_to_none=True)

    check()
    assert sum(outcomes.values()) > 0
    record_property("fuzz_examples", sum(outcomes.values()))
    record_property("fuzz_outcomes", {"with_options + step": dict(outcomes)})


# ---- names ----------------------------------------------------------------------------------

NAMES = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=string.printable, max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=200),
    st.text(alphabet=st.sampled_from(["/", "\\", ".", " ", "\x00", "\n", "\u2028", "é", "a"]),
            max_size=6),
    st.sampled_from([".", "..", "", " ", "\t", "a/..", "..\\x", "con", "nul", "~", "-rf"]),
    st.integers(), st.none(), st.binary(max_size=4),
)


def test_fuzz_task_names(tmp_path, record_property):
    outcomes = Counter()
    root = tmp_path / "root"
    root.mkdir()

    @given(NAMES)
    def check(name):
        try:
            task = muxc.Task(name=name, model=None)
        except muxc.MuxcError as e:
            outcomes[type(e).__name__] += 1
            return
        outcomes["accepted"] += 1
        path = safe_child(root, task.name)  # a kept name is one path component under root
        assert path.resolve().parent == root.resolve()
        path.mkdir(exist_ok=True)  # and the file system takes it (no "name too long")
        (path / "adapter_model.safetensors").write_bytes(b"")

    check()
    assert sum(outcomes.values()) > 0
    assert all(p.parent == root for p in root.iterdir())
    record_property("fuzz_examples", sum(outcomes.values()))
    record_property("fuzz_outcomes", {"Task(name=...)": dict(outcomes)})
