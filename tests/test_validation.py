"""Tenant safety: bad names and bad batches are refused before anything changes; a task with no
label tokens or a non-finite step is left out while the other tasks train as if it were absent."""

from __future__ import annotations

import contextlib
import copy
import math
import re

import pytest
import torch
from helpers import assert_matches, isolated, same, training_snapshot
from models import VOCAB, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc
from muxc.names import MAX_NAME_BYTES, check_name, safe_child


def _lora(base, seed):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return make_peft(base, config, seed)


def _compile(llama, **options):
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    models = {"a": _lora(llama, 1), "b": _lora(llama, 2), "c": make_peft(llama, ia3, 3)}
    tasks = [muxc.Task(name=n, model=m) for n, m in models.items()]
    return muxc.compile(tasks, muxc.Options(**options)), models


def _batches():
    return {"a": make_batch(2, 6, 1), "b": make_batch(3, 5, 2), "c": make_batch(1, 7, 3)}


def _restore(program, snap, names):
    with torch.no_grad():
        for name in names:
            st = program.states[name]
            values, _, opt, _ = snap[name]
            for p, v in zip(st.params, values):
                p.copy_(v)
                p.grad = None
            st.optimizer.load_state_dict(copy.deepcopy(opt))


# ---- names --------------------------------------------------------------------------------

BAD_NAMES = [
    (None, "must be a non-empty string"),
    (7, "must be a non-empty string"),
    ("", "must be a non-empty string"),
    (" ", "is only whitespace"),
    ("\t\n", "is only whitespace"),
    (" a", "leading or trailing whitespace; use 'a'"),
    ("a ", "leading or trailing whitespace"),
    (".", "relative path component"),
    ("..", "relative path component"),
    ("a/b", "path separator '/'"),
    ("../up", "path separator '/'"),
    ("/abs", "path separator '/'"),
    ("a\\b", re.escape("path separator '\\\\'")),
    ("a\x00b", r"control character U\+0000 at index 1"),
    ("a\x1b[31m", r"control character U\+001B"),
    ("a\u2028b", r"control character U\+2028"),
    ("x" * (MAX_NAME_BYTES + 1), f"is {MAX_NAME_BYTES + 1} bytes in UTF-8"),
    ("x" * 300, "is 300 bytes in UTF-8"),
    ("é" * 65, "is 130 bytes in UTF-8"),
]


@pytest.mark.parametrize("name,match", BAD_NAMES, ids=[repr(n)[:16] for n, _ in BAD_NAMES])
def test_bad_task_names_are_refused_at_task(name, match):
    with pytest.raises(muxc.TaskSpecError, match=match):
        muxc.Task(name=name, model=None)


GOOD_NAMES = ["sst2", "my task", "a.b", "...", "日本語", "x" * MAX_NAME_BYTES, "a-b_c"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_task_names_are_kept(name):
    assert check_name(name) == name
    assert muxc.Task(name=name, model=None).name == name


def test_name_changed_after_task_is_refused_at_compile(llama):
    task = muxc.Task(name="ok", model=_lora(llama, 1))
    task.name = ".."
    with pytest.raises(muxc.TaskSpecError, match="'..' is a relative path component"):
        muxc.compile([task])


def test_safe_child_refuses_escapes_and_symlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert safe_child(root, "a") == root / "a"
    for name in ("..", ".", "../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(muxc.UnsafePathError, match="is not inside"):
            safe_child(root, name)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(muxc.UnsafePathError, match=r"refusing to write 'link'"):
        safe_child(root, "link")


# ---- one compiled program for the batch checks (fusion auto, chunk alignment) ----------------


@pytest.fixture(scope="module")
def chunked(bases):
    program, models = _compile(bases("llama"), fusion="auto", alignment="chunk", chunk_size=4)
    program.step(_batches())  # optimizer state exists, so "unchanged" covers it
    return program, models


def test_save_adapters_writes_under_root_only(chunked, tmp_path):
    program, _ = chunked
    root = tmp_path / "out" / "ckpt"
    paths = program.save_adapters(root)
    assert paths == [root / n for n in ("a", "b", "c")]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    files = ("adapter_config.json", "adapter_model.safetensors")
    assert written == [f"out/ckpt/{n}/{f}" for n in "abc" for f in files]


def test_save_adapters_refuses_symlink_out_before_writing(chunked, tmp_path):
    program, _ = chunked
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "b").symlink_to(outside)
    with pytest.raises(muxc.UnsafePathError, match=r"refusing to write 'b'"):
        program.save_adapters(root)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == ["b"]  # nothing written for 'a' either


def test_dump_refuses_symlinked_file(chunked, tmp_path):
    program, _ = chunked
    (tmp_path / "explain.txt").symlink_to(tmp_path.parent / "elsewhere.txt")
    with pytest.raises(muxc.UnsafePathError, match="explain.txt"):
        program.dump(tmp_path)
    assert not (tmp_path.parent / "elsewhere.txt").exists()


def _set(key, r, c, value):
    def corrupt(b):
        b[key][r, c] = value
    return corrupt


def _replace(key, fn):
    def corrupt(b):
        b[key] = fn(b[key])
    return corrupt


ID, LB, MK = "input_ids", "labels", "attention_mask"


def _nan_col0(t):
    return t.float().index_fill(1, torch.tensor([0]), math.nan)


BAD_BATCHES = {  # kind: (corrupt b's batch in place, what the BatchError says after "task 'b': ")
    "id >= vocab": (_set(ID, 1, 2, VOCAB),
                    rf"{ID} value {VOCAB} at \[1, 2\] is outside the vocabulary \[0, {VOCAB}\)"),
    "negative id": (_set(ID, 2, 0, -1), rf"{ID} value -1 at \[2, 0\] is outside"),
    "float ids": (_replace(ID, torch.Tensor.float),
                  rf"{ID} has dtype torch.float32, expected int64 \(token ids are integers\)"),
    "bool ids": (_replace(ID, torch.Tensor.bool), rf"{ID} has dtype torch.bool.*tensor is a mask"),
    "int32 ids": (_replace(ID, torch.Tensor.int), rf"{ID} has dtype torch.int32.*{ID}.long\(\)"),
    "float labels": (_replace(LB, torch.Tensor.float), rf"{LB} has dtype torch.float32, expected"),
    "int32 labels": (_replace(LB, torch.Tensor.int), rf"{LB} has dtype torch.int32.*{LB}.long\(\)"),
    "label >= vocab": (_set(LB, 0, 1, VOCAB),
                       rf"{LB} value {VOCAB} at \[0, 1\] is neither -100 \(ignored\) nor a token"),
    "label -5": (_set(LB, 1, 3, -5), rf"{LB} value -5 at \[1, 3\] is neither -100"),
    "mask value 2": (_set(MK, 1, 0, 2), rf"{MK} value 2 at \[1, 0\] is not 0 or 1"),
    "mask nan": (_replace(MK, _nan_col0), rf"{MK} value nan at \[0, 0\]"),
    "labels shape": (_replace(LB, lambda t: t[:, :3]),
                     rf"{LB} must be a tensor shaped like {ID} \(3, 5\)"),
    "mask shape": (_replace(MK, lambda t: t[:2]), rf"{MK} must be a tensor shaped like {ID}"),
    "ids not a tensor": (_replace(ID, torch.Tensor.tolist), rf"{ID} must be a non-empty 2-D"),
    "empty ids": (_replace(ID, lambda t: t[:, :0]), rf"{ID} must be a non-empty 2-D"),
    "left padded": (_replace(MK, lambda t: t.flip(1)), rf"{MK} row 0 is not right-padded"),
    "label on padding": (_set(LB, 0, 4, 7), rf"{LB} value 7 at \[0, 4\] is on padding"),
}


@pytest.mark.parametrize("kind", list(BAD_BATCHES))
@pytest.mark.parametrize("call", ["step", "forward_backward", "evaluate"])
def test_bad_batch_is_refused_before_anything_changes(chunked, kind, call):
    program, _ = chunked
    program.forward_backward(_batches())  # grads exist, so "unchanged" covers them
    corrupt, match = BAD_BATCHES[kind]
    batches = _batches()
    corrupt(batches["b"])
    before, last = training_snapshot(program), program.last_step
    with pytest.raises(muxc.BatchError, match=f"task 'b': {match}"):
        getattr(program, call)(batches)
    assert same(training_snapshot(program), before)
    assert program.last_step is last
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_bool_int_float_masks_of_0_and_1_give_the_same_losses(chunked, dtype):
    program, _ = chunked
    batches = _batches()
    want = program.evaluate(batches)
    for b in batches.values():
        b["attention_mask"] = b["attention_mask"].to(dtype)
    got = program.evaluate(batches)
    assert list(got) == ["a", "b", "c"] and all(torch.equal(got[n], want[n]) for n in want)


# ---- no label tokens -------------------------------------------------------------------------


def _unlabel(batch, keep_first=False):
    b = dict(batch)
    b["labels"] = torch.full_like(batch["labels"], -100)
    if keep_first:  # a label at position 0 is never predicted (the causal shift drops it)
        b["labels"][:, 0] = batch["input_ids"][:, 0]
    return b


@pytest.mark.parametrize("keep_first", [False, True], ids=["all -100", "label at 0 only"])
def test_task_without_labels_is_skipped_and_others_match_alone(chunked, keep_first):
    program, models = chunked
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    batches = _batches()
    batches["b"] = _unlabel(batches["b"], keep_first)
    with pytest.warns(muxc.EmptyBatchWarning, match="task 'b': batch has no label tokens"):
        losses = program.forward_backward(batches)
    assert list(losses) == ["a", "c"]
    assert all(p.grad is None for p in program.states["b"].params)
    assert program.last_step["b"] == muxc.StepOutcome(None, skipped=True, why="no label tokens")
    assert program.last_step["a"] == muxc.StepOutcome(losses["a"].item())
    got = {
        n: {k: p.grad.clone() for k, p in models[n].named_parameters() if p.grad is not None}
        for n in "ac"
    }
    for st in program.states.values():
        st.optimizer.zero_grad(set_to_none=True)
    refs = {n: isolated(models[n], batches[n]) for n in "ac"}
    assert_matches(losses, got.__getitem__, refs)


def test_step_without_labels_leaves_that_task_untouched(chunked):
    program, _ = chunked
    batches = _batches()
    batches["b"] = _unlabel(batches["b"])
    before = training_snapshot(program)
    with pytest.warns(muxc.EmptyBatchWarning):
        program.step(batches)
    after = training_snapshot(program)
    assert same(after["b"], before["b"])
    assert after["a"][3][0] == before["a"][3][0] + 1  # the others stepped
    assert not same(after["a"][0], before["a"][0])


def test_all_tasks_without_labels_run_nothing(chunked, monkeypatch):
    program, _ = chunked

    def boom(*a, **k):
        raise AssertionError("the executor ran")

    monkeypatch.setattr(program.executor, "run", boom)
    before = training_snapshot(program)
    batches = {n: _unlabel(b) for n, b in _batches().items()}
    with pytest.warns(muxc.EmptyBatchWarning):
        assert program.step(batches) == {}
    assert same(training_snapshot(program), before)
    assert all(o.skipped and o.loss is None for o in program.last_step.values())
    assert list(program.last_step) == ["a", "b", "c"]


# ---- non-finite steps ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def temporal(bases):
    return _compile(bases("llama"), fusion="temporal", max_bad_steps=2)


@pytest.fixture(scope="module")
def spatial(bases):
    return _compile(bases("llama"), fusion="spatial", max_bad_steps=2)


@contextlib.contextmanager
def _huge_b(program):
    """Task b's LoRA B at 3e38 (finite): its activations overflow, its loss is NaN."""
    st = program.states["b"]
    saved = [p.detach().clone() for p in st.params]
    with torch.no_grad():
        for p in st.params:
            if p.shape[1] == 4:  # lora_B: (out, r)
                p.fill_(3e38)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(st.params, saved):
                p.copy_(v)


@pytest.mark.parametrize("fusion", [pytest.param("temporal", marks=pytest.mark.slow), "spatial"])
def test_nonfinite_task_is_skipped_and_others_train_as_without_it(request, fusion):
    program, _ = request.getfixturevalue(fusion)
    program.resume_task("b")
    batches = _batches()
    with _huge_b(program):
        start = training_snapshot(program)
        assert all(torch.isfinite(v).all() for v in start["b"][0])
        warned = r"task 'b': non-finite loss; .*\(1 of 2 bad steps"
        with pytest.warns(muxc.NonFiniteWarning, match=warned):
            losses = program.step(batches)
        assert math.isnan(losses["b"].item())
        with_bad = training_snapshot(program)
    out = program.last_step
    assert out["b"].skipped and out["b"].why == "non-finite loss" and math.isnan(out["b"].loss)
    assert not out["a"].skipped and not out["c"].skipped
    # b: adapter, optimizer state and step count unchanged (and finite); grads dropped
    assert same(with_bad["b"][0], start["b"][0]) and same(with_bad["b"][2], start["b"][2])
    assert with_bad["b"][1] == [None] * len(start["b"][1])
    assert with_bad["b"][3] == (start["b"][3][0], 1, False)
    # a and c: as if b had not been in the batches at all
    _restore(program, start, "ac")
    del batches["b"]
    program.step(batches)
    without = training_snapshot(program)
    for n in "ac":
        for got, want in zip(with_bad[n][0], without[n][0]):
            if fusion == "temporal":  # each task its own forward/backward: bit-identical
                assert torch.equal(got, want), n
            else:  # b's rows change the fused layout (GEMM shapes): equal to fp32 rounding
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_nonfinite_grad_is_caught_with_finite_loss(temporal):
    program, _ = temporal
    program.resume_task("b")
    before = training_snapshot(program)
    p = program.states["b"].params[0]
    hook = p.register_hook(lambda g: g * math.inf)
    try:
        with pytest.warns(muxc.NonFiniteWarning, match="task 'b': non-finite grad"):
            losses = program.step(_batches())
    finally:
        hook.remove()
    assert math.isfinite(losses["b"].item())
    want = muxc.StepOutcome(losses["b"].item(), skipped=True, why="non-finite grad")
    assert program.last_step["b"] == want
    after = training_snapshot(program)
    assert same(after["b"][0], before["b"][0]) and same(after["b"][2], before["b"][2])


def test_task_is_paused_after_max_bad_steps_until_resumed(temporal):
    program, _ = temporal
    program.resume_task("b")
    with _huge_b(program):
        with pytest.warns(muxc.NonFiniteWarning, match="1 of 2 bad steps"):
            program.step(_batches())
        warned = r"paused after 2 such steps.*resume_task\('b'\)"
        with pytest.warns(muxc.NonFiniteWarning, match=warned):
            program.step(_batches())
    assert program.states["b"].paused
    before = training_snapshot(program)
    with pytest.warns(muxc.TaskPausedWarning, match=r"task 'b' is paused .*resume_task\('b'\)"):
        losses = program.step(_batches())  # b's weights are fine again, but it stays paused
    assert "b" not in losses
    assert program.last_step["b"] == muxc.StepOutcome(None, skipped=True, why="paused")
    assert same(training_snapshot(program)["b"], before["b"])
    program.resume_task("b")
    losses = program.step(_batches())
    assert math.isfinite(losses["b"].item()) and not program.last_step["b"].skipped
    assert program.states["b"].steps == before["b"][3][0] + 1
    with pytest.raises(muxc.TaskSpecError, match="unknown task 'zz'"):
        program.resume_task("zz")


@pytest.mark.parametrize("value", [0, -1, True, 1.5, None])
def test_max_bad_steps_is_validated(value):
    with pytest.raises(muxc.OptionsError, match="max_bad_steps must be a positive int"):
        muxc.Options(max_bad_steps=value)
