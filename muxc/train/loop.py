"""`train(config, out_dir)`: run a `RunConfig` to the end, tasks joining and leaving.

One *run step* is one optimizer step of every running task: a task with
``grad_accumulation`` k takes part in the first k of the step's ``Program.step`` calls (each
one micro-batch per task), so every optimizer steps by the end of the run step and a
checkpoint between run steps holds no pending gradients. A task joins (``Program.add_task``,
or a new program when none is running) when ``start_step`` run steps are done, and leaves
(``Program.remove_task``) after its last step, or when it is paused after repeated non-finite
steps; its adapter is then written to ``<out>/adapters/<task>/`` (PEFT format). The run ends
when every task has left.

Checkpoints (every ``checkpoint_every`` run steps) go to ``<out>/checkpoints/step-NNNNNN/``:
``program/`` (`Program.save_checkpoint`) and ``trainer.json`` (run step, each task's status,
data position and steps, the join order, the config); ``<out>/checkpoints/latest`` names the
newest and is replaced last, so a crash at any point leaves a complete checkpoint named there.
``resume=True`` continues from it bit-identically: every adapter init and data order is a
pure function of the seeds, the running tasks are compiled in their join order and the saved
program state (adapters, optimizers, schedulers, RNG) is loaded.

The library never prints: progress goes to ``on_step(StepReport)``, the outcome is the
returned `TrainResult`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from muxc.api import Program, compile
from muxc.errors import CheckpointError, ConfigError
from muxc.names import safe_child
from muxc.save import save_task_adapter
from muxc.task import Task
from muxc.train.config import BaseConfig, RunConfig, Schedule, TaskConfig
from muxc.train.data import TaskData, load_task_data, seed_of, trained_count
from muxc.train.report import MetricsLog, plot_losses, read_rows
from muxc.train.tokenizer import Tokenizer, load_tokenizer

__all__ = ["train", "StepReport", "TaskSummary", "TrainResult", "lr_factor", "build_base",
           "optimizer_steps"]

STATE_FORMAT = "muxc-train"
STATE_VERSION = 1


@dataclass(frozen=True)
class StepReport:
    """What one run step did (passed to ``on_step``)."""

    step: int  # run steps done
    total: int  # run steps planned (tasks that skip non-finite steps run longer)
    train: Mapping[str, float]  # task -> mean train loss of its micro-batches this step
    eval: Mapping[str, float]  # task -> eval loss, for tasks evaluated after this step
    joined: tuple[str, ...]
    left: tuple[str, ...]
    checkpoint: Path | None


@dataclass(frozen=True)
class TaskSummary:
    name: str
    peft: str  # e.g. "lora r=8"
    status: str  # "done" | "paused" (after Options.max_bad_steps non-finite steps in a row)
    steps: int  # optimizer steps done
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None  # the last one
    eval_accuracy: float | None  # the last one (seq_cls tasks)
    samples: int  # training samples (after windowing)
    eval_samples: int
    adapter: Path | None


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int  # run steps done
    resumed_from: int | None  # the checkpoint's run step, when resumed
    tasks: Mapping[str, TaskSummary]
    metrics_jsonl: Path
    metrics_csv: Path
    loss_png: Path | None  # None without matplotlib
    tensorboard: Path | None  # None without the tensorboard package
    checkpoint: Path | None  # the newest checkpoint
    seconds: float
    compile_seconds: float  # compiling, adding and removing tasks
    notes: tuple[str, ...] = ()


@dataclass
class _Tenant:
    cfg: TaskConfig
    data: TaskData
    steps: int  # optimizer steps to run
    order: int  # position in the config (ties of start_step join in this order)
    status: str = "waiting"  # waiting | running | done | paused
    position: int = 0  # micro-batches consumed
    done: int = 0  # optimizer steps done
    task: Task | None = None


def lr_factor(schedule: Schedule, warmup: int, total: int) -> Callable[[int], float]:
    """The LR multiplier at optimizer step i (0-based): linear warmup ``(i+1)/(warmup+1)`` for
    ``i < warmup``, then constant, linear or cosine decay that reaches 0 just after step
    ``total - 1``.

    >>> f = lr_factor(Schedule.LINEAR, 1, 5)
    >>> [round(f(i), 3) for i in range(5)]
    [0.5, 1.0, 0.75, 0.5, 0.25]
    """

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if schedule is Schedule.CONSTANT:
            return 1.0
        progress = (i - warmup) / max(1, total - warmup)
        if schedule is Schedule.LINEAR:
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def optimizer_steps(task: TaskConfig, samples: int) -> int:
    """``task.steps``, or enough steps for ``task.epochs`` passes over ``samples``.

    >>> from muxc.train.config import DataConfig, PeftSpec
    >>> t = TaskConfig(name="t", peft=PeftSpec("lora", {}), data=DataConfig(), epochs=2.0,
    ...                batch_size=4, grad_accumulation=3)
    >>> optimizer_steps(t, 25)  # 50 samples / 12 per optimizer step
    5
    """
    if task.steps is not None:
        return task.steps
    return max(1, math.ceil(task.epochs * samples / (task.batch_size * task.grad_accumulation)))


def build_base(cfg: BaseConfig, tok: Tokenizer, seed: int) -> torch.nn.Module:
    """The frozen base: ``from_pretrained`` of a local directory (local files only) or the
    built-in tiny Llama (sized to ``tok``'s vocabulary, weights seeded by ``seed``)."""
    from transformers import AutoModelForCausalLM

    if cfg.path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(cfg.path), local_files_only=True, attn_implementation=cfg.attn_implementation,
                dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"[base] path: cannot load a causal LM from {str(cfg.path)!r} "
                              f"({type(e).__name__}: {e})") from None
        vocab = model.get_input_embeddings().num_embeddings
        if tok.vocab_size > vocab:
            raise ConfigError(f"[base] path: the tokenizer in {str(cfg.path)!r} has "
                              f"{tok.vocab_size} tokens, the model's embedding only {vocab}")
    else:
        from muxc.workloads import tiny_llama_config

        config = tiny_llama_config(hidden=cfg.hidden, layers=cfg.layers, vocab=tok.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(seed, "base"))
            model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_progress: Callable[[str, int, int, str], None] | None = None,
) -> TrainResult:
    """Run ``config`` (module doc); ``resume`` continues from ``<out_dir>/checkpoints/latest``.

    ``on_progress(stage, done, total, item)`` is `muxc.compile`'s progress callback. Torch's
    global RNG is the same after the call as before (the run seeds a forked one).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(config.seed, "run"))
        return _Run(config, Path(out_dir), on_progress).run(resume, on_step)


class _Run:
    def __init__(self, config: RunConfig, out: Path, on_progress):
        self.config = config
        self.out = out
        self.on_progress = on_progress
        self.program: Program | None = None
        self.running: list[str] = []  # join order: the program's task order
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------------------ the run

    def run(self, resume: bool, on_step) -> TrainResult:
        t0 = time.perf_counter()
        self._check_out(resume)
        self.out.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(self.config.base.path)
        self.base = build_base(self.config.base, tok, self.config.seed)
        cache = self.out / "cache"
        self.tenants: dict[str, _Tenant] = {}
        for i, t in enumerate(self.config.tasks):
            data = load_task_data(t, tok, cache, self.config.seed)
            self.tenants[t.name] = _Tenant(t, data, optimizer_steps(t, len(data.train)), i)
        total = max(t.cfg.start_step + t.steps for t in self.tenants.values())
        step = self._restore() if resume else 0
        resumed_from = step if resume else None
        metrics = MetricsLog(self.out, keep_until=resumed_from)
        latest = None
        try:
            while any(t.status in ("waiting", "running") for t in self.tenants.values()):
                joined = self._join(step)
                losses, tokens, lrs = self._step()
                step += 1
                now = round(time.perf_counter() - t0, 3)
                rows = [dict(step=step, task=n, split="train", task_step=self.tenants[n].done,
                             loss=losses[n], lr=lrs[n], tokens=tokens[n], seconds=now) for n in losses]
                evals = self._evaluate()
                rows += [dict(step=step, task=n, split="eval", task_step=self.tenants[n].done,
                              loss=v, lr=None, tokens=tok_count, seconds=now, accuracy=acc)
                         for n, (v, tok_count, acc) in evals.items()]
                left = self._leave()
                saved = None
                if self.config.checkpoint_every and step % self.config.checkpoint_every == 0 \
                        and any(t.status in ("waiting", "running") for t in self.tenants.values()):
                    saved = latest = self._checkpoint(step)
                metrics.write(rows)
                if on_step is not None:
                    scores = {n: v for n, (v, _, _) in evals.items()}
                    on_step(StepReport(step, max(total, step), losses, scores, joined, left, saved))
        finally:
            metrics.close()
        rows = read_rows(metrics.jsonl)
        png = plot_losses(rows, self.out / "loss_curves.png",
                          title=f"muxc train {self.config.path.name}")
        notes = []
        if png is None:
            notes.append("loss_curves.png skipped: matplotlib is not installed "
                         "(pip install matplotlib)")
        if metrics.tensorboard is None:
            notes.append("TensorBoard logs skipped: the tensorboard package is not installed")
        if latest is None:
            latest = self._latest()
        return TrainResult(
            out_dir=self.out, steps=step, resumed_from=resumed_from,
            tasks={n: self._summary(t, rows) for n, t in self.tenants.items()},
            metrics_jsonl=metrics.jsonl, metrics_csv=metrics.csv, loss_png=png,
            tensorboard=None if metrics.tensorboard is None else self.out / "tensorboard",
            checkpoint=latest, seconds=time.perf_counter() - t0,
            compile_seconds=self.compile_seconds, notes=tuple(notes),
        )

    def _summary(self, t: _Tenant, rows: list[dict]) -> TaskSummary:
        train = [r["loss"] for r in rows if r["task"] == t.cfg.name and r["split"] == "train"]
        evals = [r for r in rows if r["task"] == t.cfg.name and r["split"] == "eval"]
        peft = t.cfg.peft
        rank = peft.fields.get("r")
        adapter = self.out / "adapters" / t.cfg.name
        return TaskSummary(
            name=t.cfg.name, peft=peft.type + (f" r={rank}" if rank is not None else ""),
            status=t.status, steps=t.done, first_loss=train[0] if train else None,
            last_loss=train[-1] if train else None,
            eval_loss=evals[-1]["loss"] if evals else None,
            eval_accuracy=evals[-1].get("accuracy") if evals else None,
            samples=len(t.data.train), eval_samples=len(t.data.eval),
            adapter=adapter if adapter.is_dir() else None,
        )

    # ---------------------------------------------------------------------- tasks come and go

    def _make_task(self, t: _Tenant) -> Task:
        """The task's PeftModel over the shared frozen base (weights shared by identity, so no
        copy of them), its adapter (and a seq_cls task's head) initialised from its own seed,
        AdamW and its LR schedule."""
        from peft import get_peft_model

        frozen = {id(x): x for x in [*self.base.parameters(), *self.base.buffers()]}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(self.config.seed, t.cfg.seed, t.cfg.name, "init"))
            if t.cfg.task_type == "seq_cls":
                model = classifier_over(self.base, len(t.cfg.data.classes), t.data.pad_id, frozen)
                model = get_peft_model(model, t.cfg.peft.build("SEQ_CLS"))
            else:
                model = get_peft_model(copy.deepcopy(self.base, memo=dict(frozen)),
                                       t.cfg.peft.build())
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.cfg.lr, weight_decay=t.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(t.cfg.schedule, t.cfg.warmup_steps, t.steps))
        return Task(name=t.cfg.name, model=model, optimizer=opt, lr_scheduler=sched, lr=t.cfg.lr,
                    grad_accumulation=t.cfg.grad_accumulation, max_grad_norm=t.cfg.max_grad_norm)

    def _join(self, step: int) -> tuple[str, ...]:
        new = sorted((t for t in self.tenants.values()
                      if t.status == "waiting" and t.cfg.start_step <= step),
                     key=lambda t: (t.cfg.start_step, t.order))
        if not new:
            return ()
        t0 = time.perf_counter()
        for t in new:
            t.task = self._make_task(t)
            t.status = "running"
        if self.program is None:
            self.program = compile([t.task for t in new], self.config.options, self.on_progress)
        else:
            for t in new:
                self.program.add_task(t.task)
        self.running += [t.cfg.name for t in new]
        self.compile_seconds += time.perf_counter() - t0
        return tuple(t.cfg.name for t in new)

    def _leave(self) -> tuple[str, ...]:
        """Tasks done (or paused) leave the program; their adapters are written."""
        program = self.program
        leaving = []
        for name in self.running:
            t = self.tenants[name]
            if t.done >= t.steps:
                t.status = "done"
            elif program.states[name].paused:
                t.status = "paused"
            else:
                continue
            leaving.append(name)
            save_task_adapter(t.task, safe_child(safe_child(self.out, "adapters"), name))
        if not leaving:
            return ()
        t0 = time.perf_counter()
        self.running = [n for n in self.running if n not in leaving]
        if not self.running:
            self.program = None
        else:
            for name in leaving:
                program.remove_task(name)
        for name in leaving:
            self.tenants[name].task = None  # its model (and adapter) can go
        self.compile_seconds += time.perf_counter() - t0
        return tuple(leaving)

    # ------------------------------------------------------------------------ steps and eval

    def _step(self) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
        """One run step: ``(mean loss, label tokens, lr)`` per running task."""
        if self.program is None:
            return {}, {}, {}
        program = self.program
        lrs = {n: program.states[n].optimizer.param_groups[0]["lr"] for n in self.running}
        losses: dict[str, list[float]] = {n: [] for n in self.running}
        tokens = dict.fromkeys(self.running, 0)
        left_out: set[str] = set()  # a non-finite micro-batch drops the step's gradients
        rounds = max(self.tenants[n].cfg.grad_accumulation for n in self.running)
        for r in range(rounds):
            names = [n for n in self.running
                     if r < self.tenants[n].cfg.grad_accumulation and n not in left_out]
            if not names:
                break
            batches = {}
            for n in names:
                t = self.tenants[n]
                batch = t.data.batch(t.position, t.cfg.batch_size)
                t.position += 1
                tokens[n] += trained_count(batch)
                batches[n] = batch
            out = program.step(batches)
            for n in names:
                outcome = program.last_step.get(n)
                if n in out and math.isfinite(float(out[n])):
                    losses[n].append(float(out[n]))
                if outcome is not None and outcome.skipped \
                        and not outcome.why.startswith("accumulating"):
                    left_out.add(n)
        for n in self.running:
            self.tenants[n].done = program.states[n].steps
        mean = {n: sum(v) / len(v) for n, v in losses.items() if v}
        return mean, {n: tokens[n] for n in mean}, {n: lrs[n] for n in mean}

    def _evaluate(self) -> dict[str, tuple[float, int, float | None]]:
        """``(loss, labelled tokens or rows, accuracy or None)`` of every running task whose
        ``eval.every`` divides its steps done, or that just did its last step: losses from one
        fused `Program.evaluate` per batch index, a seq_cls task's accuracy from its own model
        (the same trained tensors) over the same batches."""
        due = {}
        for n in self.running:
            t = self.tenants[n]
            ev = t.cfg.eval
            if ev is None or t.done == 0:
                continue
            if t.done >= t.steps or (ev.every and t.done % ev.every == 0):
                due[n] = t.data.eval_batches(t.cfg.batch_size, ev.max_batches)
        if not due:
            return {}
        sums = dict.fromkeys(due, 0.0)
        counts = dict.fromkeys(due, 0)
        for i in range(max(len(b) for b in due.values())):
            batches = {n: b[i] for n, b in due.items() if i < len(b)}
            for n, loss in self.program.evaluate(batches).items():
                k = trained_count(batches[n])
                sums[n] += float(loss) * k
                counts[n] += k
        accuracy = {n: accuracy_of(self.tenants[n].task.model, due[n]) for n in due
                    if self.tenants[n].cfg.task_type == "seq_cls"}
        return {n: (sums[n] / counts[n], counts[n], accuracy.get(n)) for n in due if counts[n]}

    # --------------------------------------------------------------------- checkpoint/resume

    def _config_key(self) -> str:
        return json.dumps(self.config.raw, sort_keys=True, default=str)

    def _checkpoint(self, step: int) -> Path:
        root = safe_child(self.out, "checkpoints")
        where = safe_child(root, f"step-{step:06d}")
        where.mkdir(parents=True, exist_ok=True)
        if self.program is not None:
            self.program.save_checkpoint(safe_child(where, "program"))
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
            "running": self.running, "program": self.program is not None,
            "tenants": {n: {"status": t.status, "position": t.position, "done": t.done}
                        for n, t in self.tenants.items()},
            "config": self._config_key(),
        }
        _write_atomic(safe_child(where, "trainer.json"), json.dumps(state, indent=1) + "\n")
        _write_atomic(safe_child(root, "latest"), where.name + "\n")
        for old in root.glob("step-*"):  # only the newest is kept
            if old.name != where.name and old.is_dir():
                shutil.rmtree(old)
        return where

    def _latest(self) -> Path | None:
        pointer = self.out / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        return safe_child(self.out / "checkpoints", pointer.read_text().strip())

    def _check_out(self, resume: bool) -> None:
        previous = (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists()
        if not resume and previous:
            raise ConfigError(
                f"{str(self.out)!r} holds a previous run (metrics.jsonl or checkpoints/); pass "
                "--resume to continue it, or choose another output directory (--out)")
        if resume and self._latest() is None:
            raise ConfigError(
                f"nothing to resume in {str(self.out)!r}: no checkpoints/latest (checkpoints are "
                "written every checkpoint_every run steps; 0 writes none); run without --resume")

    def _restore(self) -> int:
        where = self._latest()
        try:
            state = json.loads((where / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{str(where / 'trainer.json')!r} is unreadable ({e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
                or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{str(where / 'trainer.json')!r} is not a muxc train state "
                                  f"(format {STATE_FORMAT} version {STATE_VERSION})")
        if state["config"] != self._config_key():
            raise ConfigError(
                f"{self.config.path}: the config differs from the one the checkpoint in "
                f"{str(where)!r} was written with; resume with the same config (or start a new "
                "run in another --out)")
        saved = state["tenants"]
        if sorted(saved) != sorted(self.tenants):
            raise CheckpointError(f"{str(where)!r} holds tasks {sorted(saved)}, the config "
                                  f"{sorted(self.tenants)}")
        for n, rec in saved.items():
            t = self.tenants[n]
            t.status, t.position, t.done = rec["status"], rec["position"], rec["done"]
        self.running = list(state["running"])
        if self.running:
            t0 = time.perf_counter()
            for n in self.running:
                self.tenants[n].task = self._make_task(self.tenants[n])
            self.program = compile([self.tenants[n].task for n in self.running], self.config.options,
                                   self.on_progress)
            self.program.load_checkpoint(where / "program")
            self.compile_seconds += time.perf_counter() - t0
            wrong = {n: (self.program.states[n].steps, self.tenants[n].done) for n in self.running
                     if self.program.states[n].steps != self.tenants[n].done}
            if wrong:
                raise CheckpointError(f"{str(where)!r}: program and trainer step counts disagree "
                                      f"{wrong}; the checkpoint is damaged")
        return int(state["step"])


def classifier_over(base: torch.nn.Module, num_labels: int, pad_id: int,
                    frozen: dict) -> torch.nn.Module:
    """A ``*ForSequenceClassification`` model of ``base``'s architecture whose backbone is
    ``base``'s (tensors shared by identity via the ``frozen`` deepcopy memo) and whose head is
    new (``reset_parameters`` under the caller's seed); ``pad_token_id`` set for HF's pooling."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(base.config)
    config.num_labels, config.pad_token_id = num_labels, pad_id
    config.id2label = {i: str(i) for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    prefix = base.base_model_prefix
    with torch.device("meta"):  # no second backbone is allocated
        model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, prefix, copy.deepcopy(getattr(base, prefix), memo=dict(frozen)))
    for name, child in model.named_children():
        if name != prefix:
            child.to_empty(device="cpu")
            for m in child.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def accuracy_of(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of labelled rows whose argmax logit is the label (``model`` in eval mode, no
    gradients; its training mode is restored)."""
    was = model.training
    model.eval()
    right = total = 0
    try:
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                keep = b["labels"] != -100
                right += int((logits.argmax(-1)[keep] == b["labels"][keep]).sum())
                total += int(keep.sum())
    finally:
        model.train(was)
    return right / total if total else float("nan")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
