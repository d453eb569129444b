"""Bias training (``LoraConfig(bias="all" | "lora_only")``): a task trains its own copy of a
frozen base op's bias.

PEFT makes the base layer's ``bias`` parameter trainable (``"lora_only"``: the base layers of
the LoRA targets; ``"all"``: every parameter named ``*.bias``, LayerNorms included). Each task
holds its own model, so its own bias tensor. In the merged graph the base op is shared: it
reads ONE frozen snapshot ``b_shared`` of the bias (`share_frozen_weights` never shares or
compares a trained bias), and the site adds ``b_task - b_shared`` on the task's token segment::

    op(x, W, b_task) = op(x, W, b_shared) + (b_task - b_shared)

which holds for every op whose bias is added to its output's last dim (``nn.Linear``, GPT-2
``Conv1D``, ``nn.LayerNorm``; other modules are refused). The task's gradient w.r.t. its bias is
then the sum over its tokens of the output gradient, exactly as alone. Cost: one pointwise add
over the task's segment of the output per site; a ``(n,)`` trainable vector per task.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from muxc.errors import UnsupportedPeftError
from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["BIAS", "bias_delta", "trained_bias_modules", "bias_site"]

# modules whose bias is added to the last dim of their output
_ADDITIVE = (torch.nn.Linear, torch.nn.LayerNorm, Conv1D)
_WRAPPER_PARTS = ("base_layer",)


@torch.library.custom_op("muxc::bias_delta", mutates_args=())
def bias_delta(h: torch.Tensor, frozen: torch.Tensor, bias: torch.Tensor, site: str) -> torch.Tensor:
    """``h + (bias - frozen)``: ``h`` computed with the frozen bias, moved to the task's own.

    While tracing one task both are its bias (the delta is zero and the base op carries the
    gradient); in the merged graph ``frozen`` is the shared snapshot."""
    return h + (bias - frozen).to(h.dtype)


@bias_delta.register_fake
def _(h, frozen, bias, site):
    return torch.empty_like(h)


def _setup(ctx, inputs, output):
    h, frozen, bias, site = inputs
    ctx.bias_dtype = bias.dtype


def _backward(ctx, dy):
    db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return dy, -db, db, None


bias_delta.register_autograd(_backward, setup_context=_setup)


def bias_site(path: str) -> str:
    """The site of the bias of module ``path``: its path with PEFT wrappers removed (a LoRA
    target's bias lives on ``<target>.base_layer``; its site is the target's, as LoRA's)."""
    return ".".join(p for p in path.split(".") if p not in _WRAPPER_PARTS)


def _own_bias(mod: torch.nn.Module) -> torch.nn.Parameter | None:
    b = mod._parameters.get("bias")
    return b if isinstance(b, torch.nn.Parameter) and b.requires_grad else None


def trained_bias_modules(task_name: str, hf: torch.nn.Module, cfg, lora_layers: dict) -> dict:
    """Module path -> module whose own ``bias`` the task trains, by PEFT's rule for
    ``cfg.bias`` (``lora_layers``: the adapter's LoRA layers by path). A bias that does not
    require grad is left frozen; a module whose bias is not additive raises."""
    mode = getattr(cfg, "bias", "none") or "none"
    if mode == "none":
        return {}
    if mode.endswith("_only"):
        found = {f"{p}.base_layer": m.get_base_layer() for p, m in lora_layers.items()
                 if isinstance(m, BaseTunerLayer)}
    else:  # "all": PEFT trains every parameter named *.bias
        skip = {id(p) for m in hf.modules() if isinstance(m, BaseTunerLayer)
                for attr in m.adapter_layer_names if getattr(m, attr, None) is not None
                for p in getattr(m, attr).parameters()}
        found = {p: m for p, m in hf.named_modules()
                 if ".original_module." not in f".{p}." and ".modules_to_save." not in f".{p}."
                 and _own_bias(m) is not None and id(m._parameters["bias"]) not in skip}
    out = {}
    for path, mod in found.items():
        if _own_bias(mod) is None:
            continue
        if not isinstance(mod, _ADDITIVE):
            raise UnsupportedPeftError(
                f"task {task_name!r}: bias={mode!r} trains the bias of {path!r} "
                f"({type(mod).__name__}); muxc trains biases of Linear, Conv1D and LayerNorm "
                "modules only; freeze it (requires_grad_(False)) or use bias='none'"
            )
        out[path] = mod
    return out


def _records(task: str, path: str, mod, adapter: str) -> AdapterRecord:
    return AdapterRecord(
        task=task,
        site=bias_site(path),
        kind=AdapterKind.BIAS,
        dispatch=Dispatch.OUTPUT,
        aggregate=Aggregate.ADD_BIAS,
        params={"bias": mod.bias},
        param_names={"bias": f"{path}.bias"},
        rank=0,
    )


def _traced_forward(site: str, adapter: str):
    def forward(self, x, *args, **kwargs):
        h = type(self).forward(self, x, *args, **kwargs)
        return bias_delta(h, self.bias, self.bias, site)

    return forward


def _apply(site, x: torch.Tensor, t: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """``t + (b_task - b_shared)`` on every bias-training task's segment; others unchanged."""
    shared = frozen["bias"]
    flat = t.reshape(-1, t.shape[-1])
    parts = torch.split(flat, list(mux.seg_lens))
    out = [p + (params[task]["bias"] - shared).to(p.dtype) if task in recs else p
           for task, p in zip(mux.tasks, parts)]
    return torch.cat(out).view(t.shape)


BIAS = AdapterKindSpec(
    kind=AdapterKind.BIAS,
    peft_type="LORA",
    peft_layers=(),  # not a PEFT layer: the base op's own bias (`trained_bias_modules`)
    config_problems=lambda cfg: [],
    holds=lambda mod, adapter: False,
    records=_records,
    traced_forward=_traced_forward,
    trace_op=torch.ops.muxc.bias_delta.default,
    adapted_arg=0,
    input_arg=None,
    param_args=(2, 3),
    kernel_op="",
    apply=_apply,
    # priced as IA3's per-token pointwise op over the output width (a scale and an add move
    # the same bytes)
    cost_op="ia3",
    cost_dims=lambda k, n, r, pre: (n,),
    flops_per_token=lambda k, n, r, pre: float(n),
    numel=lambda k, n, r, pre: n,
    adds_to_output=False,
    for_config=lambda cfg: False,  # never a config's kind: LoRA (or DoRA) configs carry it
    frozen_args=(1,),
    frozen_names=("bias",),
    trains_base=True,
)
