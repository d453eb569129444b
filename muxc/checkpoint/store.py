"""`save_checkpoint` / `load_checkpoint`: everything a program needs to continue bit-identically.

Layout of a checkpoint directory (data only: safetensors and JSON, never pickle)::

    manifest.json                      format, versions, options, tasks, every file's sha256
    rng.safetensors                    torch CPU generator state (+ one per CUDA device)
    tasks/<task>/adapter_config.json   PEFT format: PeftModel.from_pretrained(base, this dir)
    tasks/<task>/adapter_model.safetensors
    tasks/<task>/prompt_encoder.safetensors  prompt learning only (prefix tuning, prompt tuning,
                                       P-tuning): the encoder's own parameters (PEFT's format
                                       holds only its output)
    tasks/<task>/training.json         optimizer / LR-scheduler state_dict trees (`codec`)
    tasks/<task>/training.safetensors  their tensors

Loading reads and checks everything against the program first (hashes, formats, options, task
names, adapter tensor names/shapes/dtypes, PEFT configs, optimizer and scheduler kinds and
structure) and changes nothing if any check fails; then it applies all of it, rolling back to
the state before the call if applying fails.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from muxc.checkpoint.atomic import atomic_directory, previous, sha256
from muxc.checkpoint.codec import decode, encode
from muxc.errors import CheckpointError
from muxc.frontends.peft import adapter_name_of
from muxc.names import safe_child
from muxc.save import save_task_adapter
from muxc.version import __version__

if TYPE_CHECKING:
    from muxc.runtime.training import TaskState
    from muxc.task import Task

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "VERSION"]

# ``program`` below is a `muxc.Program` (not imported: muxc.api imports this module).

FORMAT = "muxc-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING = "training.json"
TRAINING_TENSORS = "training.safetensors"
RNG = "rng.safetensors"
PROMPT_ENCODER = "prompt_encoder.safetensors"


# ---------------------------------------------------------------------------------- saving


def save_checkpoint(program: Any, path: str | Path) -> Path:
    """Write ``program``'s whole training state to directory ``path`` (replaced atomically)."""
    _single_process(program, "save_checkpoint")
    pending = {n: f"{s.micro_steps} of {s.accumulation}" for n, s in program.states.items()
               if s.micro_steps}
    if pending:
        raise CheckpointError(
            f"save_checkpoint: task(s) are between optimizer steps with accumulated gradients "
            f"(micro-batches done: {pending}), and gradients are not saved; save after the step "
            "on which every task's optimizer stepped (a multiple of its grad_accumulation)"
        )
    path = Path(path)
    with atomic_directory(path) as tmp:
        tasks_dir = safe_child(tmp, "tasks")
        entries = {}
        for name in program.mux.tasks:
            task, state = program.tasks[name], program.states[name]
            where = safe_child(tasks_dir, name)
            save_task_adapter(task, where)
            if _adapter_file(task) != ADAPTER:
                own = {k: v.detach().contiguous().cpu() for k, v in _adapter_state(task).items()}
                _write_file(safe_child(where, PROMPT_ENCODER), dump_tensors(own, {"format": "pt"}))
            tensors: dict[str, torch.Tensor] = {}
            sched = state.lr_scheduler
            tree = {
                "optimizer": encode(state.optimizer.state_dict(), "optimizer/", tensors,
                                    f"task {name!r} optimizer state"),
                "lr_scheduler": None if sched is None else encode(
                    sched.state_dict(), "lr_scheduler/", tensors, f"task {name!r} lr_scheduler state"),
            }
            _write_file(safe_child(where, TRAINING_TENSORS), dump_tensors(tensors, {"format": "pt"}))
            _write_file(safe_child(where, TRAINING), _json(tree))
            entries[name] = {
                "adapter": {k: _spec(v) for k, v in _adapter_state(task).items()},
                "peft_config": _peft_config(task),
                "optimizer": type(state.optimizer).__name__,
                "lr_scheduler": None if sched is None else type(sched).__name__,
                "steps": state.steps,
                "bad_steps": state.bad_steps,
                "paused": state.paused,
            }
        _write_file(safe_child(tmp, RNG), dump_tensors(_rng_state(), {"format": "pt"}))
        files = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "muxc": __version__,
            "torch": torch.__version__,
            "options": options_dict(program.options),
            "tasks": list(program.mux.tasks),
            "task_state": entries,
            "files": files,
        }
        _write_file(safe_child(tmp, MANIFEST), _json(manifest))
    return path


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json(tree) -> bytes:
    return (json.dumps(tree, indent=1, allow_nan=False) + "\n").encode()


def _spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def options_dict(options) -> dict[str, Any]:
    """Options as plain JSON values (enums by their value)."""
    out = {}
    for f in fields(options):
        v = getattr(options, f.name)
        out[f.name] = v.value if isinstance(v, Enum) else v
    return out


def _plain(value):
    """A PEFT config value as canonical JSON data (sets sorted, enums by value)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _peft_config(task: Task) -> dict:
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    config = _plain(task.model.peft_config[adapter].to_dict())
    config.pop("inference_mode", None)
    return config


def _adapter_state(task: Task) -> dict[str, torch.Tensor]:
    """The task's adapter tensors under their PEFT names (views of its parameters); for prompt
    learning (prefix tuning, prompt tuning, P-tuning), its prompt encoder's own parameters (PEFT
    saves the encoder's output instead)."""
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    if _prompt_learning(task):
        return dict(task.model.prompt_encoder[adapter].named_parameters())
    return get_peft_model_state_dict(task.model, adapter_name=adapter)


def _prompt_learning(task: Task) -> bool:
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    cfg = task.model.peft_config[adapter]
    return bool(getattr(cfg, "is_prompt_learning", False))


def _adapter_file(task: Task) -> str:
    """The file of a task's checkpoint directory holding what `_adapter_state` lists."""
    return PROMPT_ENCODER if _prompt_learning(task) else ADAPTER


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _single_process(program: Any, what: str) -> None:
    if program.stage_group is not None:
        raise CheckpointError(
            f"{what}: checkpoints of programs whose stages run on several processes "
            f"(Options(stages={program.options.stages}) in a torch.distributed group) are not "
            "supported yet; save_adapters works there, or train with stages in one process"
        )


# ---------------------------------------------------------------------------------- loading


@dataclass
class _TaskLoad:
    """One task's checked checkpoint contents, ready to apply."""

    params: list[tuple[torch.Tensor, torch.Tensor]]  # (the task's parameter, saved value)
    optimizer: dict
    lr_scheduler: dict | None
    steps: int
    bad_steps: int
    paused: bool


def load_checkpoint(program: Any, path: str | Path) -> None:
    """Restore what `save_checkpoint` wrote; all or nothing (module doc)."""
    _single_process(program, "load_checkpoint")
    path = Path(path)
    if not path.is_dir():
        old = previous(path)
        hint = (f"; a save was interrupted between its two renames and left the previous "
                f"checkpoint at {str(old)!r}: rename it to {str(path)!r}") if old else ""
        raise CheckpointError(f"no checkpoint directory at {str(path)!r}{hint}")
    manifest = _read_json(path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is not a muxc checkpoint manifest "
                              f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{str(path / MANIFEST)!r}: checkpoint format version "
                              f"{manifest.get('version')!r}; this muxc reads version {VERSION}")
    files = _get(manifest, "files", dict, MANIFEST)
    _check_files(path, files)
    _check_options(program, _get(manifest, "options", dict, MANIFEST))
    names = _get(manifest, "tasks", list, MANIFEST)
    entries = _get(manifest, "task_state", dict, MANIFEST)
    for name in program.mux.tasks:  # shapes first: a foreign program is named as such
        if name in names and name in entries:
            _check_specs(program, name, _get(entries[name], "adapter", dict, f"task {name!r} in the manifest"))
    missing = [t for t in program.mux.tasks if t not in names or t not in entries]
    extra = [t for t in names if t not in program.mux.tasks]
    if missing or extra:
        raise CheckpointError(
            f"{str(path)!r} does not hold this program's tasks: task(s) {missing} of the program "
            f"are missing from it, task(s) {extra} in it are not in the program "
            f"{list(program.mux.tasks)}; load it into a program compiled from the same tasks "
            "(add_task/remove_task first)"
        )
    needed = [RNG] + [f"tasks/{t}/{f}" for t in program.mux.tasks
                      for f in (ADAPTER, ADAPTER_CONFIG, TRAINING, TRAINING_TENSORS)]
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise CheckpointError(f"the manifest of {str(path)!r} does not list {unlisted[:3]}: "
                              "every file muxc reads must be listed with its hash")
    loads = {name: _read_task(program, path, name, entries[name]) for name in program.mux.tasks}
    rng = _read_rng(path)
    _apply(program, loads, rng)


def _get(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where}: field {key!r} is missing or not a {kind.__name__} "
                              f"(got {type(value).__name__}); the checkpoint is damaged")
    return value


def _read_json(root: Path, rel: str):
    p = safe_child(root, rel)
    try:
        return json.loads(p.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(
            f"{str(p)!r} is missing; {str(root)!r} is not a complete muxc checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(p)!r} is not valid JSON ({e}); the file is damaged") from None


def _read_tensors(root: Path, rel: str) -> dict[str, torch.Tensor]:
    p = safe_child(root, rel)
    try:
        return load_tensors(p.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{str(p)!r} is missing") from None
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise CheckpointError(f"{str(p)!r} is not a readable safetensors file ({e}); it is "
                              "truncated or damaged (muxc never reads pickles)") from None


def _check_files(root: Path, files: dict) -> None:
    """Every listed file exists with its recorded size and SHA-256."""
    for rel, want in files.items():
        p = safe_child(root, rel)
        if not p.is_file():
            raise CheckpointError(f"{str(p)!r} listed in the manifest is missing")
        if not isinstance(want, dict) or p.stat().st_size != want.get("bytes"):
            raise CheckpointError(f"{str(p)!r} has {p.stat().st_size} bytes, the manifest says "
                                  f"{want.get('bytes') if isinstance(want, dict) else None}: "
                                  "truncated or replaced")
        if sha256(p) != want.get("sha256"):
            raise CheckpointError(f"{str(p)!r} does not match its SHA-256 in the manifest: it was "
                                  "modified after the checkpoint was written")


def _check_options(program: Any, saved: dict) -> None:
    mine = options_dict(program.options)
    # an option newer than the checkpoint is absent from it: the checkpoint ran with its default
    saved = {**options_dict(type(program.options)()), **saved}
    diff = [f"{k}: checkpoint {saved.get(k)!r}, program {mine.get(k)!r}"
            for k in sorted(set(mine) | set(saved)) if saved.get(k, "<absent>") != mine.get(k, "<absent>")]
    if diff:
        raise CheckpointError(
            f"the checkpoint was saved with other options ({'; '.join(diff)}); compile with "
            "the checkpoint's options (muxc.Options.from_dict) or use program.with_options(...)"
        )


def _read_task(program: Any, root: Path, name: str, entry: dict) -> _TaskLoad:
    task, state = program.tasks[name], program.states[name]
    where = f"task {name!r}"
    base = f"tasks/{name}"
    # adapter: names, shapes, dtypes, PEFT config
    source = f"{base}/{_adapter_file(task)}"
    saved = _read_tensors(root, source)
    current = _adapter_state(task)
    _check_specs(program, name, {k: _spec(v) for k, v in saved.items()}, source)
    config = _get(entry, "peft_config", dict, f"{where} in the manifest")
    mine = _peft_config(task)
    changed = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
    if changed:
        k = changed[0]
        raise CheckpointError(f"{where}: PEFT config field {k!r} is {config.get(k)!r} in the checkpoint, "
                              f"{mine.get(k)!r} in the program (differing fields: {changed})")
    by_ptr = {p.data_ptr(): p for p in state.params}
    params = []
    for key, value in current.items():
        p = by_ptr.get(value.data_ptr())
        if p is None or p.shape != value.shape:
            raise CheckpointError(f"{where}: adapter tensor {key!r} is not one of the task's trained "
                                  "parameters; this adapter layout cannot be checkpointed yet")
        params.append((p, saved[key]))
    # optimizer and LR scheduler
    tree = _read_json(root, f"{base}/{TRAINING}")
    tensors = _read_tensors(root, f"{base}/{TRAINING_TENSORS}")
    if not isinstance(tree, dict) or "optimizer" not in tree:
        raise CheckpointError(f"{where}: {TRAINING} has no optimizer state")
    opt = decode(tree["optimizer"], tensors, f"{where} optimizer")
    kind = _get(entry, "optimizer", str, f"{where} in the manifest")
    if kind != type(state.optimizer).__name__:
        raise CheckpointError(f"{where}: the checkpoint holds {kind} state, the task's optimizer "
                              f"is {type(state.optimizer).__name__}")
    _check_optimizer(where, opt, state)
    sched = decode(tree.get("lr_scheduler"), tensors, f"{where} lr_scheduler")
    saved_kind = entry.get("lr_scheduler")
    mine_kind = None if state.lr_scheduler is None else type(state.lr_scheduler).__name__
    shape_ok = sched is None or isinstance(sched, dict)
    if saved_kind != mine_kind or (sched is None) != (mine_kind is None) or not shape_ok:
        raise CheckpointError(f"{where}: LR scheduler {saved_kind!r} in the checkpoint, {mine_kind!r} "
                              "in the program; give the task the same kind of scheduler")
    steps = _get(entry, "steps", int, f"{where} in the manifest")
    bad = _get(entry, "bad_steps", int, f"{where} in the manifest")
    paused = _get(entry, "paused", bool, f"{where} in the manifest")
    return _TaskLoad(params, opt, sched, steps, bad, paused)


def _check_specs(program: Any, name: str, saved: dict, source: str = MANIFEST) -> None:
    """The adapter tensor names, shapes and dtypes ``source`` records for task ``name`` are the
    program's."""
    current = {k: _spec(v) for k, v in _adapter_state(program.tasks[name]).items()}
    if set(saved) != set(current):
        only_saved = sorted(set(saved) - set(current))[:3]
        only_mine = sorted(set(current) - set(saved))[:3]
        raise CheckpointError(
            f"task {name!r}: adapter tensors in {source} differ from the program's (only in the "
            f"checkpoint: {only_saved}; only in the program: {only_mine}); the checkpoint was "
            "saved from another adapter configuration")
    for key, spec in current.items():
        if saved[key] != spec:
            raise CheckpointError(
                f"task {name!r}: adapter tensor {key!r} is {saved[key]} in {source}, {spec} in the "
                "program; the checkpoint was saved from another adapter configuration")


def _check_optimizer(where: str, saved, state: TaskState) -> None:
    mine = state.optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{where}: optimizer state has no 'state'/'param_groups'")
    groups = saved["param_groups"]
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    want = [len(g["params"]) for g in mine["param_groups"]]
    if sizes != want:
        raise CheckpointError(f"{where}: optimizer parameter groups hold {sizes} tensors in the "
                              f"checkpoint, {want} in the program")
    ids = {i for g in mine["param_groups"] for i in g["params"]}
    saved_ids = [i for g in groups for i in g["params"]]
    if sorted(saved_ids) != sorted(ids) or not set(saved["state"]) <= ids:
        raise CheckpointError(f"{where}: optimizer state refers to parameters the task does not have")


def _read_rng(root: Path) -> dict[str, torch.Tensor]:
    rng = _read_tensors(root, RNG)
    cpu = rng.get("cpu")
    mine = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != mine.shape:
        raise CheckpointError(f"{str(root / RNG)!r}: no CPU generator state of {tuple(mine.shape)} bytes")
    return rng


def _snapshot(program: Any, loads: dict[str, _TaskLoad]) -> dict:
    return {
        "params": [(p, p.detach().clone()) for ld in loads.values() for p, _ in ld.params],
        "states": {n: (copy.deepcopy(s.optimizer.state_dict()),
                       None if s.lr_scheduler is None else copy.deepcopy(s.lr_scheduler.state_dict()),
                       s.steps, s.bad_steps, s.paused) for n, s in program.states.items()},
        "rng": _rng_state(),
    }


def _restore(program: Any, snap: dict) -> None:
    with torch.no_grad():
        for p, value in snap["params"]:
            p.copy_(value)
    for n, (opt, sched, steps, bad, paused) in snap["states"].items():
        s = program.states[n]
        s.optimizer.load_state_dict(opt)
        if sched is not None:
            s.lr_scheduler.load_state_dict(sched)
        s.steps, s.bad_steps, s.paused = steps, bad, paused
    _set_rng(snap["rng"])


def _set_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng)) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _apply(program: Any, loads: dict[str, _TaskLoad], rng: dict[str, torch.Tensor]) -> None:
    snap = _snapshot(program, loads)
    try:
        for name, ld in loads.items():
            s = program.states[name]
            with torch.no_grad():
                for p, value in ld.params:
                    p.copy_(value)
            s.optimizer.load_state_dict(ld.optimizer)
            s.optimizer.zero_grad(set_to_none=True)
            if ld.lr_scheduler is not None:
                s.lr_scheduler.load_state_dict(ld.lr_scheduler)
            s.steps, s.bad_steps, s.paused = ld.steps, ld.bad_steps, ld.paused
        _set_rng(rng)
    except Exception as e:
        _restore(program, snap)
        raise CheckpointError(f"applying the checkpoint failed ({type(e).__name__}: {e}); the program "
                              "was left as it was before load_checkpoint") from e
