"""Program.save_checkpoint / load_checkpoint: exact resume, atomic saves, all-or-nothing loads."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ckpt_worker import SAVE_AFTER, STEPS, batches, build, final_tensors
from models import make_peft
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

import muxc
import muxc.checkpoint.store as store

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _own_rng():
    """load_checkpoint restores torch's global RNG: give it back to other tests afterwards."""
    with torch.random.fork_rng():
        yield


def _state(program: muxc.Program) -> dict:
    """Everything load_checkpoint may change, copied."""
    return {
        "tensors": final_tensors(program),
        "counters": {n: (s.steps, s.bad_steps, s.paused) for n, s in program.states.items()},
        "sched": {n: s.lr_scheduler.state_dict() for n, s in program.states.items() if s.lr_scheduler},
        "lr": {n: [g["lr"] for g in s.optimizer.param_groups] for n, s in program.states.items()},
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["counters"] == b["counters"] and a["sched"] == b["sched"] and a["lr"] == b["lr"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    """The worker's three tasks trained 2 steps and checkpointed (tests restore this state), and
    ``final``: the tensors of the same run continued, uninterrupted, to step 4."""
    with torch.random.fork_rng():
        program = build(llama)
        for step in range(1, SAVE_AFTER + 1):
            program.step(batches(step))
        path = tmp_path_factory.mktemp("ckpt") / "run"
        state = _state(program)
        program.save_checkpoint(path)  # only reads the program: the run goes on unchanged
        for step in range(SAVE_AFTER + 1, STEPS + 1):
            program.step(batches(step))
        final = final_tensors(program)
        program.load_checkpoint(path)
        yield SimpleNamespace(program=program, path=path, state=state, final=final)


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _rehash(path: Path, rel: str) -> None:
    """Record ``rel``'s current size and hash in the manifest (a careful forger)."""
    data = (path / rel).read_bytes()
    _edit_manifest(path, lambda m: m["files"].__setitem__(
        rel, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def test_resume_after_sigkill_is_bit_identical(saved, tmp_path):
    """Train in a process, save at step 2, SIGKILL it during step 3, resume in a new process:
    adapters and optimizer states equal an uninterrupted run (``saved.final``) bit for bit."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    worker = str(TESTS / "ckpt_worker.py")
    opts = dict(cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
    resumer = subprocess.Popen([sys.executable, worker, "resume", str(ckpt), str(out)],
                               stdin=subprocess.PIPE, **opts)  # compiles while the trainer runs
    trainer = subprocess.Popen([sys.executable, worker, "train", str(ckpt)], **opts)
    try:
        lines = []
        for line in trainer.stdout:
            lines.append(line.strip())
            if lines[-1] == f"step {SAVE_AFTER + 1}":
                trainer.send_signal(signal.SIGKILL)
                break
        assert trainer.wait(timeout=120) == -signal.SIGKILL, lines
        assert lines[-3:] == [f"step {SAVE_AFTER}", "saved", f"step {SAVE_AFTER + 1}"], lines
        assert resumer.stdout.readline().strip() == "ready"
        resumer.stdin.write("go\n")
        resumer.stdin.flush()
        assert resumer.stdout.readline().strip() == "done"
        assert resumer.wait(timeout=120) == 0
    finally:
        for p in (trainer, resumer):
            if p.poll() is None:
                p.kill()
                p.wait()
    got, want = load_file(out), saved.final
    assert got.keys() == want.keys() and any("/opt/" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the RNG state is part of it: without it, dropout (task "a" only) draws other masks
    program = saved.program
    with torch.random.fork_rng():
        program.load_checkpoint(ckpt)
        torch.manual_seed(99)
        for step in range(SAVE_AFTER + 1, STEPS + 1):
            program.step(batches(step))
    other = final_tensors(program)
    assert not torch.equal(other["a/param/0"], want["a/param/0"])
    assert all(torch.equal(other[k], want[k]) for k in want if not k.startswith("a/"))
    program.load_checkpoint(saved.path)


def test_round_trip_restores_counters_and_peft_format(llama, saved, tmp_path):
    program = saved.program
    program.states["b"].bad_steps, program.states["b"].paused = 2, True
    program.save_checkpoint(tmp_path / "c")
    program.states["b"].bad_steps, program.states["b"].paused = 0, False
    program.load_checkpoint(tmp_path / "c")
    assert (program.states["b"].bad_steps, program.states["b"].paused) == (2, True)
    program.load_checkpoint(saved.path)
    _assert_same(_state(program), saved.state)
    assert {s.steps for s in program.states.values()} == {SAVE_AFTER}
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama),
                                       str(saved.path / "tasks" / "a"))
    theirs = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    mine = {k: v for k, v in program.tasks["a"].model.named_parameters() if "lora_" in k}
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    manifest = json.loads((saved.path / "manifest.json").read_text())
    assert manifest["tasks"] == ["a", "b", "c"] and manifest["muxc"] == muxc.__version__
    assert manifest["task_state"]["c"]["lr_scheduler"] == "StepLR"
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in saved.path.rglob("*"))


def test_crash_mid_save_leaves_previous_checkpoint(saved, monkeypatch):
    program = saved.program
    program.step(batches(SAVE_AFTER + 1))
    real, calls = store._write_file, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:  # task "a" written, task "b" half written
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store, "_write_file", failing)
    with pytest.raises(OSError, match="No space"):
        program.save_checkpoint(saved.path)
    monkeypatch.undo()
    assert not list(saved.path.parent.glob(".run.muxc-tmp-*"))  # the temp dir was removed
    program.load_checkpoint(saved.path)
    _assert_same(_state(program), saved.state)


def _damaged(saved, tmp_path, damage) -> Path:
    path = tmp_path / "damaged"
    shutil.copytree(saved.path, path)
    damage(path)
    return path


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("forged_hash", [False, True])
def test_malicious_pickle_is_never_run(saved, tmp_path, forged_hash):
    marker = tmp_path / "pwned"
    rel = "tasks/a/training.safetensors"

    def damage(path):
        (path / rel).write_bytes(pickle.dumps(_Evil(marker)))
        if forged_hash:
            _rehash(path, rel)

    path = _damaged(saved, tmp_path, damage)
    before = _state(saved.program)
    match = "not a readable safetensors" if forged_hash else "bytes"
    with pytest.raises(muxc.CheckpointError, match=match) as err:
        saved.program.load_checkpoint(path)
    assert rel in str(err.value)
    assert not marker.exists()
    _assert_same(_state(saved.program), before)


@pytest.mark.parametrize("case", ["truncated", "truncated-rehashed", "flipped-byte"])
def test_truncated_or_tampered_file(saved, tmp_path, case):
    rel = "tasks/b/adapter_model.safetensors"

    def damage(path):
        data = (path / rel).read_bytes()
        if case == "flipped-byte":
            data = data[:-1] + bytes([data[-1] ^ 1])
        else:
            data = data[: len(data) // 2]
        (path / rel).write_bytes(data)
        if case == "truncated-rehashed":
            _rehash(path, rel)

    path = _damaged(saved, tmp_path, damage)
    before = _state(saved.program)
    match = {"truncated": "truncated", "truncated-rehashed": "not a readable", "flipped-byte": "SHA-256"}[case]
    with pytest.raises(muxc.CheckpointError, match=match) as err:
        saved.program.load_checkpoint(path)
    assert rel in str(err.value)
    _assert_same(_state(saved.program), before)


def test_task_missing(saved, tmp_path):
    def damage(path):
        def drop(m):
            m["tasks"].remove("c")
            del m["task_state"]["c"]
            m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("tasks/c/")}
        _edit_manifest(path, drop)
        shutil.rmtree(path / "tasks" / "c")

    path = _damaged(saved, tmp_path, damage)
    before = _state(saved.program)
    with pytest.raises(muxc.CheckpointError, match=r"task\(s\) \['c'\] of the program are missing"):
        saved.program.load_checkpoint(path)
    _assert_same(_state(saved.program), before)


def test_checkpoint_of_another_program(llama, saved, tmp_path):
    other = muxc.compile([muxc.Task(name="a", model=make_peft(
        llama, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.2), 1))])
    other.save_checkpoint(tmp_path / "other")
    before = _state(saved.program)
    with pytest.raises(muxc.CheckpointError, match=r"task 'a': adapter tensor .*lora_A.*\[8, 32\].*\[4, 32\]"):
        saved.program.load_checkpoint(tmp_path / "other")
    _assert_same(_state(saved.program), before)
    with pytest.raises(muxc.CheckpointError, match=r"task 'a': adapter tensor"):
        other.load_checkpoint(saved.path)
    # other options: refused, naming the option
    with pytest.raises(muxc.CheckpointError, match="fusion: checkpoint 'auto', program 'temporal'"):
        saved.program.with_options(fusion="temporal").load_checkpoint(saved.path)
    with pytest.raises(muxc.CheckpointError, match="no checkpoint directory"):
        saved.program.load_checkpoint(tmp_path / "nowhere")
    _assert_same(_state(saved.program), before)
