"""Per-task gradient accumulation and clipping (`Task.grad_accumulation`, `Task.max_grad_norm`):
each task's optimizer steps on its own schedule, on the mean of its micro-batches' gradients,
clipped to its own norm, exactly as HF PEFT trained alone with the same settings."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
IA3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
# task -> (PEFT config, init seed, lr, grad_accumulation, max_grad_norm)
SPECS = {
    "acc3": (LORA, 1, 2e-2, 3, None),
    "clip": (IA3, 2, 5e-2, 1, 1e-3),  # tiny norm: every step is clipped
    "both": (LoraConfig(r=2, target_modules=["up_proj"], lora_dropout=0.0), 3, 1e-2, 2, 1e-2),
}


def _batch(name: str, micro: int) -> dict:
    return make_batch(2, 5 + len(name), 100 * micro + len(name))


def _trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def test_accumulation_and_clipping_equal_isolated_training(llama):
    models = {n: make_peft(llama, cfg, seed) for n, (cfg, seed, *_) in SPECS.items()}
    alone = {n: copy.deepcopy(m) for n, m in models.items()}
    tasks = [muxc.Task(name=n, model=models[n], lr=lr, grad_accumulation=k, max_grad_norm=g)
             for n, (_, _, lr, k, g) in SPECS.items()]
    program = muxc.compile(tasks)
    micro_steps = 6
    for i in range(micro_steps):
        program.step({n: _batch(n, i) for n in SPECS})
        for n, (*_, k, _g) in SPECS.items():
            state, out = program.states[n], program.last_step[n]
            stepped = (i + 1) % k == 0
            assert state.steps == (i + 1) // k and out.skipped is not stepped, (n, i)
            if not stepped:
                assert out.why == f"accumulating ({(i + 1) % k} of {k} micro-batches)"
    # the reference: HF PEFT alone, HF Trainer style (loss / k per micro-batch, clip, step)
    clipped = {}
    for n, (_, _, lr, k, g) in SPECS.items():
        params = _trainable(alone[n])
        opt = torch.optim.AdamW(params, lr=lr)
        for i in range(micro_steps):
            (alone[n](**_batch(n, i)).loss / k).backward()
            if (i + 1) % k == 0:
                if g is not None:
                    clipped[n] = torch.nn.utils.clip_grad_norm_(params, g).item() > g
                opt.step()
                opt.zero_grad()
    assert clipped == {"clip": True, "both": True}  # the clipping tests something
    for n in SPECS:
        got = dict(models[n].named_parameters())
        start = dict(make_peft(llama, SPECS[n][0], SPECS[n][1]).named_parameters())
        for name, want in alone[n].named_parameters():
            if want.requires_grad:
                assert not torch.equal(want, start[name]), (n, name)  # it trained
                assert rel_err(got[name].detach(), want.detach()) <= 1e-4, (n, name)


def test_a_checkpoint_between_optimizer_steps_is_refused(llama, tmp_path):
    model = make_peft(llama, LORA, 1)
    program = muxc.compile([muxc.Task(name="a", model=model, grad_accumulation=2)])
    program.step({"a": _batch("a", 0)})
    with pytest.raises(muxc.CheckpointError, match=r"micro-batches done: \{'a': '1 of 2'\}"):
        program.save_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    program.step({"a": _batch("a", 1)})
    program.save_checkpoint(tmp_path / "ckpt")  # on an optimizer step: fine
    assert (tmp_path / "ckpt" / "manifest.json").is_file()


def test_a_non_finite_micro_batch_drops_the_accumulated_gradients(llama):
    model = make_peft(llama, LORA, 1)
    program = muxc.compile([muxc.Task(name="a", model=model, grad_accumulation=2)])
    program.step({"a": _batch("a", 0)})
    state = program.states["a"]
    assert state.micro_steps == 1
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    before = lora_a.detach().clone()
    with torch.no_grad():
        lora_a[0, 0] = float("nan")
    with pytest.warns(muxc.NonFiniteWarning):
        program.step({"a": _batch("a", 1)})
    assert state.micro_steps == 0 and state.steps == 0 and state.bad_steps == 1
    assert all(p.grad is None for p in state.params)
    with torch.no_grad():
        lora_a.copy_(before)
    program.step({"a": _batch("a", 2)})
    program.step({"a": _batch("a", 3)})
    assert state.steps == 1 and state.micro_steps == 0 and state.bad_steps == 0


@pytest.mark.parametrize("field, value, match", [
    ("grad_accumulation", 0, "grad_accumulation must be an int >= 1, got 0"),
    ("grad_accumulation", 2.0, "grad_accumulation must be an int >= 1, got 2.0"),
    ("max_grad_norm", 0.0, "max_grad_norm must be a number > 0 or None, got 0.0"),
    ("max_grad_norm", float("nan"), "max_grad_norm must be a number > 0 or None, got nan"),
])
def test_task_refuses_bad_accumulation_and_clipping(llama, field, value, match):
    with pytest.raises(muxc.TaskSpecError, match=match):
        muxc.Task(name="a", model=None, **{field: value})
