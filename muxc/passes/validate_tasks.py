"""Pass `validate_tasks`: reject malformed task lists before any tracing. Does not mutate."""

from __future__ import annotations

from collections import Counter

from muxc.errors import TaskSpecError, TrainableBaseError
from muxc.frontends.peft import adapter_name_of, adapter_param_ids, bias_mode, hf_model, trained_biases
from muxc.frontends.quant import check_quantized, check_same_quantization
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.names import check_name
from muxc.task import Task

__all__ = ["validate_tasks"]


def validate_tasks(tasks, ctx: CompileContext) -> PassResult[tuple[Task, ...]]:
    """Check types, names, adapters and frozen base parameters; does not mutate the tasks.

    Returns the tasks as a tuple (same objects).
    """
    tasks = list(tasks) if tasks is not None else []
    if not tasks:
        raise TaskSpecError("no tasks given; pass a non-empty list of muxc.Task")
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise TaskSpecError(f"tasks[{i}] is a {type(t).__name__}, not a muxc.Task")
        check_name(t.name)  # again: Task is mutable, its name may have changed since Task(...)
    dupes = sorted(n for n, c in Counter(t.name for t in tasks).items() if c > 1)
    if dupes:
        raise TaskSpecError(f"duplicate task names {dupes}; every task needs a unique name")
    seen: dict[tuple[int, str], str] = {}
    for t in tasks:
        hf_model(t.name, t.model)
        adapter = adapter_name_of(t.name, t.model, t.adapter_name)
        key = (id(t.model), adapter)
        if key in seen:
            raise TaskSpecError(
                f"tasks {seen[key]!r} and {t.name!r} train the same adapter {adapter!r} of one "
                "model; give each task its own adapter (model.add_adapter) or model"
            )
        seen[key] = t.name
        _check_frozen(t)
        check_quantized(t.name, hf_model(t.name, t.model))
    check_same_quantization((t.name, hf_model(t.name, t.model)) for t in tasks)
    return PassResult(tuple(tasks))


def _check_frozen(task: Task) -> None:
    adapter_ids = adapter_param_ids(task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    hf = hf_model(task.name, task.model)
    # biases the adapter trains (LoraConfig(bias=...)) are per-task deltas: muxc.kinds.bias
    adapter_ids |= {id(m.bias) for m in trained_biases(
        task.name, hf, adapter, bias_mode(task.model, adapter)).values()}
    trainable = [
        n for n, p in task.model.named_parameters() if p.requires_grad and id(p) not in adapter_ids
    ]
    if trainable:
        shown = ", ".join(trainable[:3]) + (f" (+{len(trainable) - 3} more)" if len(trainable) > 3 else "")
        raise TrainableBaseError(
            f"task {task.name!r}: base parameter(s) {shown} require grad, so the backbone "
            "cannot be shared; freeze them (p.requires_grad_(False)) or train them as an adapter"
        )
