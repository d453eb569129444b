"""Capture one task with torch.export (non-strict), adapters as opaque nodes.

The exported function is ``(input_ids, attention_mask) -> logits`` of the HF model in training
mode (as ``model.train()`` would run it) with batch and sequence dims dynamic, so one trace
serves every batch shape. HF gradient checkpointing is switched off while tracing (muxc's runtime
recomputes layers itself: `muxc.frontends.checkpointing`). With ``with_positions`` it is ``(input_ids, attention_mask,
position_ids) -> logits``: chunk alignment packs samples and restarts positions per sample.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export import Dim
from torch.export.graph_signature import InputKind

from muxc.errors import TraceError
from muxc.frontends.checkpointing import checkpointing_off
from muxc.frontends.peft import (
    adapter_name_of,
    adapter_param_ids,
    adapter_records,
    bias_mode,
    head_info,
    hf_model,
    is_seq_cls,
    normalize_fqn,
    prompt_encoder_of,
    routed_adapters,
    seq_cls_head_attr,
)
from muxc.frontends.quant import check_quantized, routed_quantized, state_tensor
from muxc.frontends.release import (
    drop_unread_meta,
    forget_source_lines,
    release_export_state,
    share_module_stacks,
)
from muxc.kinds import spec_for_trace_op, spec_of
from muxc.kinds.prefix import is_prefix
from muxc.ir import Binding, BindingKind, NodeInfo, Role, TaskGraph, set_info
from muxc.task import Task

__all__ = ["trace_task", "export_task", "bind_and_tag", "Export", "EXAMPLE_SHAPE", "lifted_tensors"]

EXAMPLE_SHAPE = (2, 8)  # (batch, seq) of the example input; >1 so export keeps dims dynamic
_PREFIX = "m."  # attribute name of the HF model inside _Logits
_PROMPT_PREFIX = "p."  # ... and of a prompt-learning task's prompt encoder


class _Logits(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits``: the part of an HF causal LM muxc traces."""

    def __init__(self, model: torch.nn.Module, prompt: torch.nn.Module | None = None):
        super().__init__()
        self.m = model
        if prompt is not None:  # a prompt encoder: its parameters lift as parameters, not constants
            self.p = prompt

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _LogitsAt(_Logits):
    """``(input_ids, attention_mask, position_ids) -> logits``."""

    def forward(self, input_ids, attention_mask, position_ids):
        return self.m(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits


class _SeqCls(torch.nn.Module):
    """``(input_ids, attention_mask[, position_ids]) -> per-token head logits`` of a sequence
    classifier: its backbone (the same modules and FQNs as the causal LM's) and its head, with
    HF's pooling left to the task's loss (`muxc.ir.HeadLoss`), which knows each row's last
    non-padding token."""

    def __init__(self, model: torch.nn.Module, head: str, with_positions: bool):
        super().__init__()
        self.m = model
        self.head = head
        self.with_positions = with_positions

    def forward(self, input_ids, attention_mask, position_ids=None):
        trunk = getattr(self.m, self.m.base_model_prefix)
        extra = {"position_ids": position_ids} if self.with_positions else {}
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        return getattr(self.m, self.head)(hidden.last_hidden_state)


_KINDS = {
    InputKind.PARAMETER: BindingKind.PARAMETER,
    InputKind.BUFFER: BindingKind.BUFFER,
    InputKind.CONSTANT_TENSOR: BindingKind.CONSTANT,
    InputKind.USER_INPUT: BindingKind.USER_INPUT,
}


@dataclass(frozen=True)
class Export:
    """A task's `TaskGraph` plus what re-binding it to another task needs (`rebind`).

    ``targets`` maps each non-user placeholder to the FQN it was lifted from in the traced
    module (``"m."`` + the HF model's FQN, PEFT wrappers included).
    """

    graph: TaskGraph
    targets: dict[str, str]


def trace_task(task: Task, with_positions: bool = False) -> TaskGraph:
    """Export ``task.model`` (its ``task.adapter_name``) into a `TaskGraph`. Does not mutate it."""
    return export_task(task, with_positions).graph


def export_task(task: Task, with_positions: bool = False) -> Export:
    """`trace_task`, keeping each placeholder's source FQN (`Export`). Does not mutate the model."""
    hf = hf_model(task.name, task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    records = adapter_records(task.name, hf, adapter, bias_mode(task.model, adapter), model=task.model)
    prompt = prompt_encoder_of(task.name, task.model, adapter)
    encoder = prompt[1] if prompt is not None else None
    check_quantized(task.name, hf)
    device = next(hf.parameters()).device
    ids = torch.zeros(EXAMPLE_SHAPE, dtype=torch.long, device=device)
    mask = torch.ones(EXAMPLE_SHAPE, dtype=torch.long, device=device)
    dims = {0: Dim.AUTO, 1: Dim.AUTO}
    was_training = hf.training
    t0 = time.perf_counter()
    try:
        hf.train()
        routing = (contextlib.nullcontext() if is_prefix(task.model, adapter)  # no layer to route
                   else routed_adapters(task.name, hf, adapter, bias_mode(task.model, adapter),
                                        model=task.model))
        with routing, \
                checkpointing_off(hf), \
                routed_quantized(task.name, hf), \
                forget_source_lines():
            if is_seq_cls(hf):
                wrapper = _SeqCls(hf, seq_cls_head_attr(task.name, hf, adapter), with_positions)
                args = (ids, mask) + ((torch.arange(EXAMPLE_SHAPE[1], device=device)
                                       .expand(EXAMPLE_SHAPE).clone(),) if with_positions else ())
                ep = torch.export.export(wrapper, args, dynamic_shapes=(dims,) * len(args), strict=False)
            elif with_positions:
                pos = torch.arange(EXAMPLE_SHAPE[1], device=device).expand(EXAMPLE_SHAPE).clone()
                ep = torch.export.export(
                    _LogitsAt(hf, encoder), (ids, mask, pos), dynamic_shapes=(dims, dims, dims), strict=False
                )
            else:
                ep = torch.export.export(
                    _Logits(hf, encoder), (ids, mask), dynamic_shapes=(dims, dims), strict=False
                )
    except Exception as e:  # torch.export raises many types; keep the cause attached
        raise TraceError(
            f"task {task.name!r}: torch.export could not capture {type(hf).__name__}: "
            f"{type(e).__name__}: {str(e)[:500]}; muxc needs a causal LM that exports with "
            "torch.export (non-strict) taking input_ids and attention_mask"
        ) from e
    finally:
        hf.train(was_training)
    seconds = time.perf_counter() - t0
    gm = ep.graph_module
    drop_unread_meta(gm)
    share_module_stacks(gm)
    _check_dynamic(task.name, gm)
    lifted, targets = {}, {}
    for spec in ep.graph_signature.input_specs:
        kind = _KINDS.get(spec.kind)
        if kind is None:
            raise TraceError(f"task {task.name!r}: unexpected exported input kind {spec.kind}")
        if kind is BindingKind.USER_INPUT:
            lifted[spec.arg.name] = (kind, None)
            continue
        fqn = spec.target
        targets[spec.arg.name] = fqn
        lifted[spec.arg.name] = (kind, ep.constants[fqn] if fqn in ep.constants else ep.state_dict[fqn])
    graph = bind_and_tag(task, gm, records, lifted, targets)
    graph.trace_seconds = seconds
    release_export_state(gm)  # else each export's ShapeEnv and fakes stay for good (module doc)
    return Export(graph, targets)


def bind_and_tag(task: Task, gm: fx.GraphModule, records, lifted, targets) -> TaskGraph:
    """The `TaskGraph` of ``task`` over ``gm`` (whose node records it writes).

    ``lifted`` maps each placeholder to ``(BindingKind, tensor)`` (None for user inputs),
    ``targets`` each non-user placeholder to its FQN in the traced module.
    """
    # a trained base bias keeps its backbone name: the frozen op reads it too (muxc.kinds.bias)
    adapter_fqns = {id(t): n for r in records if not spec_of(r.kind).trains_base for n, t in _named(r)}
    other_adapters = adapter_param_ids(task.model) - set(adapter_fqns)
    # the frozen original a trained head replaces is never run: not a backbone weight
    unused = {n.name for n in gm.graph.find_nodes(op="placeholder") if not n.users}
    other_adapters |= {id(t) for ph, (_, t) in lifted.items() if ph in unused and t is not None
                       and ".original_module." in f".{targets.get(ph, '')}."}
    bindings = {}
    trunk = _trunk_names(hf_model(task.name, task.model))
    for ph, (kind, tensor) in lifted.items():
        if kind is BindingKind.USER_INPUT:
            bindings[ph] = Binding(kind, ph)
            continue
        name = adapter_fqns.get(id(tensor), normalize_fqn(targets[ph].removeprefix(_PREFIX)))
        name = trunk.get(id(tensor), name)
        bindings[ph] = Binding(kind, name, tensor)
    _tag(task.name, gm, bindings, adapter_fqns, other_adapters)
    hf = hf_model(task.name, task.model)
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    return TaskGraph(
        task=task.name,
        gm=gm,
        bindings=bindings,
        adapters=records,
        model_type=getattr(hf.config, "model_type", type(hf).__name__),
        head=head_info(task.name, task.model, adapter),
    )


def _trunk_names(hf: torch.nn.Module) -> dict[int, str]:
    """id -> the backbone FQN of each tensor also reachable outside the backbone (a tied LM
    head exports under ``lm_head.weight`` in a causal LM but under the embedding's name in a
    sequence classifier): tasks of both kinds then name it alike."""
    prefix = getattr(hf, "base_model_prefix", "") + "."
    names: dict[int, list[str]] = {}
    for n, p in hf.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    out = {}
    for i, ns in names.items():
        inside = sorted(n for n in ns if n.startswith(prefix))
        if len(ns) > 1 and inside:
            out[i] = normalize_fqn(inside[0])
    return out


def lifted_tensors(
    hf: torch.nn.Module, targets: Iterable[str], prompt: torch.nn.Module | None = None
) -> dict[str, torch.Tensor | None]:
    """The tensor each export target (an `Export.targets` value) names in ``hf`` now: a
    parameter, buffer or tensor attribute; None where it names none (a constant the trace made).
    Targets of a prompt encoder (``"p."``) name parameters of ``prompt``."""
    named = dict(hf.named_parameters(remove_duplicate=False))
    named.update(hf.named_buffers(remove_duplicate=False))
    out = {}
    for target in targets:
        if target.startswith(_PROMPT_PREFIX):
            found = dict(prompt.named_parameters()) if prompt is not None else {}
            out[target] = found.get(target.removeprefix(_PROMPT_PREFIX))
            continue
        fqn = target.removeprefix(_PREFIX)
        tensor = named.get(fqn)
        if tensor is None and target.startswith(_PREFIX):
            path, _, attr = fqn.rpartition(".")
            try:
                mod = hf.get_submodule(path)
            except AttributeError:
                mod = None
            tensor = getattr(mod, attr, None)
            if tensor is None and mod is not None:  # a quantized layer's lifted state tensor
                tensor = state_tensor(mod, attr)
        out[target] = tensor if isinstance(tensor, torch.Tensor) else None
    return out


def _named(rec):
    for role, t in rec.params.items():
        yield rec.param_names[role], t


def _check_dynamic(task_name: str, gm: fx.GraphModule) -> None:
    users = [
        n for n in gm.graph.find_nodes(op="placeholder")
        if n.name in ("input_ids", "attention_mask", "position_ids")
    ]
    for n in users:
        shape = n.meta["val"].shape
        if any(isinstance(d, int) for d in shape[:2]):
            raise TraceError(
                f"task {task_name!r}: export specialised {n.name} to shape {tuple(shape)}; "
                "muxc needs batch and sequence dims dynamic (a model branching on them cannot "
                "be compiled yet)"
            )


def _tag(task_name: str, gm, bindings: dict[str, Binding], adapter_fqns, other_adapters) -> None:
    """Record each node's role in its ``meta["muxc"]``.

    Parameters of the model's other adapters (unused by this task) are tagged as adapter
    parameters too, so they never count as frozen backbone weights.
    """
    adapter_names = set(adapter_fqns.values())
    every = frozenset({task_name})
    for node in gm.graph.nodes:
        src = ((task_name, node.name),)
        if node.op == "placeholder":
            b = bindings[node.name]
            if b.kind is BindingKind.USER_INPUT:
                role = Role.INPUT
            elif b.fqn in adapter_names or id(b.tensor) in other_adapters:
                role = Role.ADAPTER_PARAM
            else:
                role = Role.FROZEN
            set_info(node, NodeInfo(role=role, tasks=every, fqn=b.fqn, sources=src))
        elif node.op == "output":
            set_info(node, NodeInfo(role=Role.OUTPUT, tasks=every, sources=src))
        elif node.op == "call_function" and spec_for_trace_op(node.target) is not None:
            set_info(node, NodeInfo(role=Role.ADAPTER, tasks=every, site=node.args[-1], sources=src))
        else:
            set_info(node, NodeInfo(role=Role.BACKBONE, tasks=every, sources=src))
