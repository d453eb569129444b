"""Read a PEFT model: validate what muxc supports, list each adapter in unified form, and
route adapter layers through muxc's opaque ops for the duration of a trace.

Supported now: prefix tuning (`muxc.kinds.prefix`: no layer to route, the base model is
traced as is), LoRA and DoRA on ``nn.Linear`` and GPT-2 ``Conv1D`` base layers (any targets,
ranks, alpha, rslora, rank/alpha patterns, dropout, ``bias="none"``, ``"all"`` or
``"lora_only"``: `muxc.kinds.bias`), IA3 (attention and
feed-forward), and prompt tuning / P-tuning (`muxc.kinds.prompt`: the PeftModel's prompt encoder,
applied at the word embedding; functions that read it take the PeftModel as ``model=``).
Everything else raises `UnsupportedPeftError` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

from muxc.errors import TaskSpecError, UnsupportedPeftError
from muxc.ir import CAUSAL_LM, AdapterKind, AdapterRecord, HeadInfo
from muxc.kinds import KINDS, SUPPORTED, spec_for_config, spec_for_layer
from muxc.kinds.bias import BIAS, bias_site, trained_bias_modules
from muxc.kinds.module_copy import MODULE_COPY, check_copyable
from muxc.kinds.prefix import is_prefix, prefix_records

__all__ = [
    "SUPPORTED",
    "hf_model",
    "vocab_sizes",
    "adapter_name_of",
    "normalize_fqn",
    "adapter_layers",
    "copied_modules",
    "adapter_records",
    "bias_mode",
    "trained_biases",
    "routed_adapters",
    "adapter_param_ids",
    "head_info",
    "is_seq_cls",
    "seq_cls_head_attr",
    "output_head_paths",
    "prompt_encoder_of",
]

# Model FQNs relative to the HF model: PEFT prefixes and wrappers removed.
_WRAPPER_PARTS = ("base_layer", "original_module")


def hf_model(task_name: str, model) -> torch.nn.Module:
    """The HF model inside a PeftModel (the module torch.export traces)."""
    if not isinstance(model, PeftModel):
        raise TaskSpecError(
            f"task {task_name!r}: model must be a peft.PeftModel (from get_peft_model or "
            f"PeftModel.from_pretrained), got {type(model).__name__}"
        )
    return model.get_base_model()


def vocab_sizes(task_name: str, model) -> tuple[int, int]:
    """``(input ids, label classes)``: rows of the input embedding and the LM head's width."""
    hf = hf_model(task_name, model)
    rows = hf.get_input_embeddings().weight.shape[0]
    head = getattr(hf.get_output_embeddings(), "weight", None)
    return rows, (head.shape[0] if head is not None else hf.config.vocab_size)


def adapter_name_of(task_name: str, model: PeftModel, adapter_name: str | None) -> str:
    """Resolve and check the adapter a task trains."""
    names = list(model.peft_config)
    if adapter_name is None:
        active = model.active_adapter
        if isinstance(active, (list, tuple)):
            if len(active) != 1:
                raise TaskSpecError(
                    f"task {task_name!r}: model has several active adapters {list(active)}; "
                    "pass adapter_name= to pick one"
                )
            active = active[0]
        adapter_name = active
    if adapter_name not in names:
        raise TaskSpecError(
            f"task {task_name!r}: adapter {adapter_name!r} not in the model (has {names})"
        )
    _check_config(task_name, model.peft_config[adapter_name], adapter_name)
    return adapter_name


def _check_config(task_name: str, cfg, adapter: str) -> None:
    ptype = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    where = f"task {task_name!r} (adapter {adapter!r})"
    spec = spec_for_config(cfg)
    if spec is None:
        raise UnsupportedPeftError(f"{where}: PEFT type {ptype} is not supported; supported: {SUPPORTED}")
    bad = spec.config_problems(cfg)
    if bad:
        raise UnsupportedPeftError(
            f"{where}: unsupported {ptype} option(s) {', '.join(bad)}; supported: {SUPPORTED}"
        )


def normalize_fqn(fqn: str) -> str:
    """Tensor name relative to the HF model with PEFT wrappers removed.

    >>> normalize_fqn("model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    return ".".join(p for p in fqn.split(".") if p not in _WRAPPER_PARTS)


def adapter_layers(task_name: str, hf: torch.nn.Module, adapter: str) -> dict[str, BaseTunerLayer]:
    """Module path -> PEFT layer holding ``adapter``; unsupported layer types raise."""
    found = {}
    heads = output_head_paths(hf)
    for path, mod in hf.named_modules():
        if isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save:
            if path not in heads:  # a backbone module's copy (`copied_modules`)
                check_copyable(task_name, path, mod, adapter, SUPPORTED)
                continue
            if not isinstance(mod.modules_to_save[adapter], torch.nn.Linear):
                raise UnsupportedPeftError(
                    f"task {task_name!r}: modules_to_save module {path!r} "
                    f"({type(mod.original_module).__name__}) is not the model's output head; "
                    f"muxc trains a per-task copy of the output Linear only ({sorted(heads)}); "
                    f"supported: {SUPPORTED}"
                )
            found[path] = mod
            continue
        if not isinstance(mod, BaseTunerLayer):
            continue
        holds = any(k.holds(mod, adapter) for k in KINDS.values())
        if not holds:
            if any(adapter in getattr(mod, attr, {}) for attr in ("lora_embedding_A", "lora_magnitude_vector")):
                holds = True
            else:
                continue
        where = f"task {task_name!r}: layer {path!r} ({type(mod).__module__}.{type(mod).__name__})"
        spec = spec_for_layer(mod, adapter)
        if spec is None:
            raise UnsupportedPeftError(f"{where} is not supported; supported: {SUPPORTED}")
        if getattr(mod, "merged", False):
            raise UnsupportedPeftError(
                f"{where} has merged adapters {mod.merged_adapters}; unmerge them "
                "(model.unmerge_adapter()) before compiling"
            )
        if adapter in getattr(mod, "lora_variant", {}) and spec.kind is not AdapterKind.DORA:
            variant = type(mod.lora_variant[adapter]).__name__
            raise UnsupportedPeftError(f"{where} uses LoRA variant {variant}; supported: {SUPPORTED}")
        found[path] = mod
    if not found:
        raise UnsupportedPeftError(f"task {task_name!r}: adapter {adapter!r} targets no supported layer")
    return found


def copied_modules(task_name: str, hf: torch.nn.Module, adapter: str) -> dict:
    """Module path -> ModulesToSaveWrapper whose ``adapter`` copy of a backbone module (not the
    output head) the task trains (`muxc.kinds.module_copy`); unsupported module types raise."""
    heads = output_head_paths(hf)
    found = {}
    for path, mod in hf.named_modules():
        wrapped = isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save
        if wrapped and path not in heads:
            check_copyable(task_name, path, mod, adapter, SUPPORTED)
            found[path] = mod
    return found


_SEQ_CLS_HEADS = ("score", "classifier")


def is_seq_cls(hf: torch.nn.Module) -> bool:
    return type(hf).__name__.endswith("ForSequenceClassification")


def output_head_paths(hf: torch.nn.Module) -> set[str]:
    """Module paths of the model's output head: a sequence classifier's ``score`` /
    ``classifier``, else a causal LM's output embedding (``lm_head``)."""
    if is_seq_cls(hf):
        return {n for n in _SEQ_CLS_HEADS if hasattr(hf, n)}
    out = hf.get_output_embeddings()
    return {p for p, m in hf.named_modules() if m is out or (
        isinstance(m, ModulesToSaveWrapper) and m.original_module is out)} - {""}


def seq_cls_head_attr(task_name: str, hf: torch.nn.Module, adapter: str) -> str:
    """The attribute holding a sequence classifier's head, which ``adapter`` must train."""
    for name in _SEQ_CLS_HEADS:
        mod = getattr(hf, name, None)
        if isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save:
            return name
    raise UnsupportedPeftError(
        f"task {task_name!r}: {type(hf).__name__} trains no head of its own (adapter {adapter!r} "
        f"has no modules_to_save copy of {'/'.join(_SEQ_CLS_HEADS)}); build it with "
        "LoraConfig(task_type='SEQ_CLS', ...) (PEFT then trains the head) or modules_to_save=['score']"
    )


def head_info(task_name: str, model, adapter: str) -> HeadInfo | None:
    """What the task's own head computes (None: it uses the frozen shared LM head)."""
    hf = hf_model(task_name, model)
    if is_seq_cls(hf):
        seq_cls_head_attr(task_name, hf, adapter)
        cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        return HeadInfo("seq_cls", num_labels=int(hf.config.num_labels),
                        problem_type=hf.config.problem_type, pad_token_id=cfg.pad_token_id)
    for path in output_head_paths(hf):
        mod = hf.get_submodule(path)
        if isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save:
            return HeadInfo(CAUSAL_LM)
    return None


def bias_mode(model, adapter: str) -> str:
    """The adapter's ``bias`` option: which base biases it trains ("none", "all", "lora_only")."""
    return getattr(model.peft_config[adapter], "bias", "none") or "none"


def trained_biases(task_name: str, hf: torch.nn.Module, adapter: str, bias: str) -> dict:
    """Module path -> module whose own bias the task trains (`muxc.kinds.bias`)."""
    if bias == "none":
        return {}
    cfg = types.SimpleNamespace(bias=bias)
    return trained_bias_modules(task_name, hf, cfg, adapter_layers(task_name, hf, adapter))


def adapter_records(
    task_name: str, hf: torch.nn.Module, adapter: str, bias: str = "none", model=None
) -> list[AdapterRecord]:
    """The task's adapters in unified form, holding the user's own parameter tensors (with
    ``bias`` other than "none", its trained base biases too, `bias_mode`). Prompt-learning
    adapters live on the PeftModel, not in ``hf``: pass it as ``model``; a prefix-tuning adapter
    is read from its prompt encoder (`muxc.kinds.prefix`), a prompt-tuning or P-tuning one from
    its encoder at the word embedding (`muxc.kinds.prompt`)."""
    if model is not None and is_prefix(model, adapter):
        return prefix_records(task_name, model, adapter)
    prompt = prompt_encoder_of(task_name, model, adapter) if model is not None else None
    if prompt is not None:
        site, encoder = prompt
        return [spec_for_config(model.peft_config[adapter]).records(task_name, site, encoder, adapter)]
    recs = [spec_for_layer(mod, adapter).records(task_name, path, mod, adapter)
            for path, mod in adapter_layers(task_name, hf, adapter).items()]
    recs += [BIAS.records(task_name, path, mod, adapter)
             for path, mod in trained_biases(task_name, hf, adapter, bias).items()]
    recs += [MODULE_COPY.records(task_name, path, mod, adapter)
             for path, mod in copied_modules(task_name, hf, adapter).items()]
    return recs


def adapter_param_ids(model: PeftModel) -> set[int]:
    """ids of every adapter parameter of every adapter in ``model`` (not base weights)."""
    ids = set()
    for encoder in getattr(model, "prompt_encoder", {}).values():  # prompt learning, all kinds
        ids.update(id(p) for p in encoder.parameters())
    for mod in model.modules():
        if isinstance(mod, ModulesToSaveWrapper):
            ids.update(id(p) for p in mod.modules_to_save.parameters())
        if isinstance(mod, BaseTunerLayer):
            for attr in mod.adapter_layer_names:
                container = getattr(mod, attr, None)
                if container is not None:
                    ids.update(id(p) for p in container.parameters())
    return ids


def prompt_encoder_of(task_name: str, model, adapter: str) -> tuple[str, torch.nn.Module] | None:
    """``(word-embedding path in the HF model, prompt encoder)`` of a prompt-learning adapter
    (prompt tuning, P-tuning); None for other adapters (prefix tuning included: it has no
    virtual tokens). The embedding PEFT prepends to must be the model's input embedding (else
    `UnsupportedPeftError`)."""
    cfg = model.peft_config[adapter]
    if not getattr(cfg, "is_prompt_learning", False) or is_prefix(model, adapter):
        return None
    hf = hf_model(task_name, model)
    emb = getattr(model, "word_embeddings", None)
    paths = [p for p, m in hf.named_modules() if m is emb and m is hf.get_input_embeddings()]
    if not paths:
        raise UnsupportedPeftError(
            f"task {task_name!r}: PEFT found word embeddings {type(emb).__name__} that are not the "
            f"model's input embedding; muxc applies virtual tokens at the input embedding only"
        )
    return paths[0], model.prompt_encoder[adapter]


@contextlib.contextmanager
def routed_adapters(
    task_name: str, hf: torch.nn.Module, adapter: str, bias: str = "none", model=None
) -> Iterator[None]:
    """Route ``adapter``'s layers through muxc's opaque ops, only inside the ``with`` block.

    Patches are per instance (``module.forward``), never on PEFT's classes, and are removed on
    exit even if tracing fails. Layers of other adapters of the same model run their base op
    only while tracing (an inactive adapter has no effect on this task). Modules whose bias the
    task trains (``bias``) add a `muxc.kinds.bias` node after their output. A prompt-learning
    adapter of ``model`` adds its `muxc.kinds.prompt` node after the word embedding.
    """
    prompt = prompt_encoder_of(task_name, model, adapter) if model is not None else None
    if prompt is not None:
        site, encoder = prompt
        emb = hf.get_submodule(site)
        fwd = spec_for_config(model.peft_config[adapter]).traced_forward(site, adapter)
        emb.forward = types.MethodType(functools.partial(fwd, encoder=encoder), emb)
        try:
            yield
        finally:
            del emb.forward
        return
    layers = {p: m for p, m in hf.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))}
    mine = adapter_layers(task_name, hf, adapter)
    copied = copied_modules(task_name, hf, adapter)
    patched = []
    try:
        for path, mod in layers.items():
            if path in copied:
                fwd = MODULE_COPY.traced_forward(path, adapter)
            elif path in mine:
                fwd = spec_for_layer(mod, adapter).traced_forward(path, adapter)
            else:
                fwd = _base_only_forward
            mod.forward = types.MethodType(fwd, mod)
            patched.append(mod)
        for path, mod in trained_biases(task_name, hf, adapter, bias).items():
            mod.forward = types.MethodType(BIAS.traced_forward(bias_site(path), adapter), mod)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def _base_only_forward(self, x, *args, **kwargs):
    if isinstance(self, ModulesToSaveWrapper):
        return self.original_module(x, *args, **kwargs)
    return self.base_layer(x, *args, **kwargs)
