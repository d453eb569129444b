"""A training process for the checkpoint tests (`tests/test_checkpoint.py` runs it).

``python ckpt_worker.py train CKPT``: trains three tasks, saves a checkpoint after step 2, then
keeps training (printing ``step <k>`` before step k) until it is killed.
``python ckpt_worker.py resume CKPT OUT``: compiles the same tasks from scratch, prints
``ready``, waits for a line on stdin, loads CKPT, trains steps 3 and 4 and writes every task's
adapter and optimizer tensors to OUT (safetensors), then prints ``done``.

The test imports `build`, `batches` and `final_tensors` to train the uninterrupted reference.
"""

from __future__ import annotations

import sys

import torch
from models import build_base, make_batch, make_peft
from peft import IA3Config, LoraConfig

import muxc

SEED = 1234  # the global RNG (LoRA dropout) is seeded right after compiling
STEPS = 4
SAVE_AFTER = 2


def build(base=None) -> muxc.Program:
    """Three tasks: LoRA with dropout + AdamW, LoRA + SGD momentum, IA3 + AdamW + StepLR."""
    base = build_base("llama") if base is None else base
    a = make_peft(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.2), 1)
    b = make_peft(base, LoraConfig(r=8, target_modules=["up_proj", "o_proj"], lora_dropout=0.0), 2)
    c = make_peft(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 3)
    sgd = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=3e-2, momentum=0.9)
    adam_c = torch.optim.AdamW([p for p in c.parameters() if p.requires_grad], lr=5e-2)
    sched = torch.optim.lr_scheduler.StepLR(adam_c, step_size=1, gamma=0.7)
    tasks = [muxc.Task(name="a", model=a, lr=1e-2),
             muxc.Task(name="b", model=b, optimizer=sgd),
             muxc.Task(name="c", model=c, optimizer=adam_c, lr_scheduler=sched)]
    program = muxc.compile(tasks)
    torch.manual_seed(SEED)
    return program


def batches(step: int) -> dict:
    """Step ``step``'s batches (1-based), different every step."""
    return {"a": make_batch(2, 6, 10 + step), "b": make_batch(3, 9, 20 + step), "c": make_batch(1, 6, 30 + step)}


def final_tensors(program: muxc.Program) -> dict[str, torch.Tensor]:
    """Every task's adapter parameters and optimizer state tensors, by a stable name."""
    out = {}
    for name, state in program.states.items():
        for i, p in enumerate(state.params):
            out[f"{name}/param/{i}"] = p.detach().clone()
        for pid, entry in state.optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}/opt/{pid}/{key}"] = value.detach().clone()
    return out


def main(argv: list[str]) -> int:
    mode, ckpt = argv[1], argv[2]
    program = build()
    if mode == "train":
        for step in range(1, 1000):
            print(f"step {step}", flush=True)
            program.step(batches(step))
            if step == SAVE_AFTER:
                program.save_checkpoint(ckpt)
                print("saved", flush=True)
        return 3  # never reached: the test kills this process during step 3
    if mode == "resume":
        from safetensors.torch import save_file

        print("ready", flush=True)
        sys.stdin.readline()
        program.load_checkpoint(ckpt)
        assert {s.steps for s in program.states.values()} == {SAVE_AFTER}
        for step in range(SAVE_AFTER + 1, STEPS + 1):
            program.step(batches(step))
        save_file(final_tensors(program), argv[3])
        print("done", flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
